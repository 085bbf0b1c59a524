//! surfnet-tool: starts a real local Solana RPC (surfpool-core's surfnet, on LiteSVM) offline on
//! 127.0.0.1:<port> (WebSocket on <port + 1>) and runs until killed. Usage: `surfnet-tool [port]` (default 18899).
use std::time::Instant;

use crossbeam_channel::unbounded;
use surfpool_core::surfnet::svm::SurfnetSvm;
use surfpool_types::{RpcConfig, SimnetConfig, SimnetEvent, SurfpoolConfig};

fn main() {
    let t0 = Instant::now();
    let port: u16 = match std::env::args().nth(1).map(|p| p.parse::<u16>()) {
        None => 18899,
        Some(Ok(p)) if p < u16::MAX => p,
        Some(_) => {
            eprintln!("surfnet-tool: the port must be a number below 65535 (the WebSocket takes port + 1)");
            std::process::exit(2);
        }
    };
    let config = SurfpoolConfig {
        simnets: vec![SimnetConfig {
            // Offline: no mainnet RPC behind it (the default would fetch missing accounts from mainnet).
            offline_mode: true,
            remote_rpc_url: None,
            ..SimnetConfig::default()
        }],
        rpc: RpcConfig {
            bind_host: "127.0.0.1".to_string(),
            bind_port: port,
            ws_port: port + 1,
            ..RpcConfig::default()
        },
        ..SurfpoolConfig::default()
    };
    let (svm, simnet_events_rx, geyser_events_rx) = SurfnetSvm::default();
    let (cmd_tx, cmd_rx) = unbounded();
    let spawned = hiro_system_kit::thread_named("surfnet").spawn(move || {
        let fut = surfpool_core::start_local_surfnet(svm, config, cmd_tx, cmd_rx, geyser_events_rx);
        if let Err(e) = hiro_system_kit::nestable_block_on(fut) {
            eprintln!("surfnet-tool: runloop error: {e:?}");
            std::process::exit(1);
        }
    });
    let runloop = match spawned {
        Ok(handle) => handle,
        Err(e) => {
            eprintln!("surfnet-tool: cannot start the runloop thread: {e}");
            std::process::exit(1);
        }
    };
    // Drain the events so the channel never fills; say when it is ready.
    loop {
        match simnet_events_rx.recv() {
            Ok(SimnetEvent::CoreStarted(n)) => {
                println!(
                    "surfnet-tool: ready on http://127.0.0.1:{port} after {:?} (replayed {n})",
                    t0.elapsed()
                );
            }
            Ok(SimnetEvent::Aborted(e)) => {
                eprintln!("surfnet-tool: aborted: {e}");
                std::process::exit(1);
            }
            Ok(SimnetEvent::ErrorLog(_, e)) => eprintln!("surfnet-tool: error: {e}"),
            Ok(SimnetEvent::WarnLog(_, e)) => eprintln!("surfnet-tool: warn: {e}"),
            Ok(SimnetEvent::InfoLog(_, e)) => eprintln!("surfnet-tool: info: {e}"),
            Ok(_) => {}
            Err(_) => break,
        }
    }
    let _ = runloop.join();
}
