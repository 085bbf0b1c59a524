//! Fuzzes the SSE usage tap (`x402_gateway::proxy::sse::UsageTap`) with arbitrary upstream bytes, fed in arbitrary
//! pieces. Input: byte 0 = flags (bit 0: strip the usage event), byte 1 = piece-size seed, rest = the stream.
//!
//! Properties, beyond "never panics":
//! - the pieces do not matter: fed whole or in pieces, the tap forwards the same bytes and reports the same usage,
//!   `[DONE]` and content count;
//! - not stripping, it forwards the input byte for byte; stripping, it forwards the input minus whole events, and
//!   only when it read a usage object;
//! - it never reports usage that is not in the input: every non-zero token count it reports is written, in
//!   decimal, in the input, and `done` means the input holds `[DONE]`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use x402_gateway::proxy::sse::UsageTap;

struct Read {
    out: Vec<u8>,
    usage: Option<(u64, u64)>,
    done: bool,
    content_chunks: u64,
}

fn run(stream: &[u8], strip: bool, piece: impl Fn(usize) -> usize) -> Read {
    let mut tap = UsageTap::new(strip);
    let mut out = Vec::new();
    let mut at = 0;
    let mut i = 0;
    while at < stream.len() {
        let n = piece(i).clamp(1, stream.len() - at);
        out.extend_from_slice(&tap.feed(&stream[at..at + n]));
        at += n;
        i += 1;
    }
    out.extend_from_slice(&tap.finish());
    Read {
        out,
        usage: tap.usage.map(|u| (u.prompt_tokens, u.completion_tokens)),
        done: tap.done,
        content_chunks: tap.content_chunks,
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Whether `small` is `big` with some byte runs removed (an ordered subsequence).
fn is_subsequence(small: &[u8], big: &[u8]) -> bool {
    let mut rest = big.iter();
    small.iter().all(|b| rest.any(|c| c == b))
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let strip = data[0] & 1 == 1;
    let seed = usize::from(data[1]);
    let stream = &data[2..];
    let whole = run(stream, strip, |_| usize::MAX);
    let pieces = run(stream, strip, |i| 1 + (seed * 31 + i * 7) % 64);
    assert_eq!(
        whole.out, pieces.out,
        "the pieces changed what was forwarded"
    );
    assert_eq!(whole.usage, pieces.usage, "the pieces changed the usage");
    assert_eq!(whole.done, pieces.done);
    assert_eq!(whole.content_chunks, pieces.content_chunks);

    if strip {
        assert!(
            is_subsequence(&whole.out, stream),
            "forwarded bytes that were not sent"
        );
        if whole.usage.is_none() {
            assert_eq!(
                whole.out, stream,
                "stripped an event without reading a usage object"
            );
        }
    } else {
        assert_eq!(whole.out, stream, "not byte for byte");
    }
    if let Some((prompt, completion)) = whole.usage {
        for n in [prompt, completion] {
            if n != 0 {
                assert!(
                    contains(stream, n.to_string().as_bytes()),
                    "usage {n} is not in the input"
                );
            }
        }
    }
    if whole.done {
        assert!(contains(stream, b"[DONE]"));
    }
});
