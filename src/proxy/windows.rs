//! Daily UTC time windows of pool blocks: is a key usable now, and when is it next.

/// Seconds in a day.
const DAY: i64 = 86_400;

/// A daily window `[start_minute, end_minute)` in minutes after 00:00 UTC (end may be 1440).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub start_minute: u32,
    pub end_minute: u32,
}

impl Window {
    fn contains(&self, second_of_day: i64) -> bool {
        let start = i64::from(self.start_minute) * 60;
        let end = i64::from(self.end_minute) * 60;
        if start <= end {
            (start..end).contains(&second_of_day)
        } else {
            second_of_day >= start || second_of_day < end
        }
    }
}

/// Whether unix time `now` falls inside any of `windows`.
pub fn inside(now: i64, windows: &[Window]) -> bool {
    let sod = now.rem_euclid(DAY);
    windows.iter().any(|w| w.contains(sod))
}

/// Seconds from `now` until the next window opens (0 when inside one; `None` without windows).
pub fn seconds_until_open(now: i64, windows: &[Window]) -> Option<i64> {
    if windows.is_empty() {
        return None;
    }
    if inside(now, windows) {
        return Some(0);
    }
    let sod = now.rem_euclid(DAY);
    windows
        .iter()
        .map(|w| {
            let start = i64::from(w.start_minute) * 60;
            (start - sod).rem_euclid(DAY)
        })
        .min()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ASIA: Window = Window {
        start_minute: 0,
        end_minute: 480,
    };
    const EUROPE: Window = Window {
        start_minute: 480,
        end_minute: 960,
    };
    const AMERICAS: Window = Window {
        start_minute: 960,
        end_minute: 1440,
    };
    /// 2026-11-21T00:00:00Z.
    const MIDNIGHT: i64 = 1_795_219_200;

    #[test]
    fn edges_are_half_open() {
        let at = |h: i64, m: i64, s: i64| MIDNIGHT + h * 3600 + m * 60 + s;
        assert!(inside(at(7, 59, 59), &[ASIA]));
        assert!(!inside(at(8, 0, 0), &[ASIA]));
        assert!(inside(at(8, 0, 0), &[EUROPE]));
        assert!(inside(at(23, 59, 59), &[AMERICAS]));
        assert!(!inside(at(0, 0, 0), &[AMERICAS]));
        assert_eq!(seconds_until_open(at(8, 0, 0), &[ASIA]), Some(16 * 3600));
        assert_eq!(seconds_until_open(at(7, 59, 59), &[EUROPE]), Some(1));
        assert_eq!(
            seconds_until_open(at(12, 0, 0), &[ASIA, AMERICAS]),
            Some(4 * 3600)
        );
        assert_eq!(seconds_until_open(at(3, 0, 0), &[ASIA]), Some(0));
        assert_eq!(seconds_until_open(at(3, 0, 0), &[]), None);
    }
}
