//! A fault-injecting TCP proxy on loopback, for network faults without root (network namespaces
//! and iptables need it) and for the one fault iptables cannot give: latency (`tc netem` is not
//! available on these kernels). One proxy stands in front of one listener of one broker; the
//! broker advertises the proxy's address, so every client and every follower reaches it through
//! the proxy (the controller wire is not proxied: a voter's quorum address is its own listener).
//!
//! Faults, switched at run time and healed by [`FaultProxy::set`]`(Mode::Pass)`:
//! - `Delay(d)`: every chunk waits `d` before it is forwarded, in both directions;
//! - `HoldInbound` / `HoldOutbound`: one direction stops (bytes wait in the proxy and TCP's
//!   buffers, and are delivered when the fault heals: a one-way blackhole that loses nothing the
//!   protocol cannot lose);
//! - `Drop`: every connection is reset and new ones are closed at once.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What the proxy does to the bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Forward at once.
    Pass,
    /// Forward each chunk after this long.
    Delay(Duration),
    /// Hold what the clients send to the broker.
    HoldInbound,
    /// Hold what the broker sends back.
    HoldOutbound,
    /// Reset every connection; close new ones at once.
    Drop,
}

struct Shared {
    mode: Mutex<Mode>,
    /// Bumped by every `Drop`: connections older than it are reset.
    generation: AtomicU64,
    stop: AtomicBool,
}

/// A proxy from a loopback port to `target`, until dropped.
pub(crate) struct FaultProxy {
    pub(crate) addr: String,
    shared: Arc<Shared>,
    accept: Option<std::thread::JoinHandle<()>>,
}

/// How often blocked reads and held directions look at the mode again.
const TICK: Duration = Duration::from_millis(20);

impl FaultProxy {
    /// A proxy to `target` (`host:port`), listening on a free loopback port.
    pub(crate) fn start(target: &str) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let shared = Arc::new(Shared {
            mode: Mutex::new(Mode::Pass),
            generation: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        });
        let target = target.to_string();
        let accept = {
            let shared = Arc::clone(&shared);
            std::thread::spawn(move || accept_loop(&listener, &target, &shared))
        };
        FaultProxy {
            addr,
            shared,
            accept: Some(accept),
        }
    }

    /// Switches the fault (`Mode::Pass` heals).
    pub(crate) fn set(&self, mode: Mode) {
        if mode == Mode::Drop {
            self.shared.generation.fetch_add(1, Ordering::SeqCst);
        }
        *self.shared.mode.lock().unwrap() = mode;
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
    }
}

fn accept_loop(listener: &TcpListener, target: &str, shared: &Arc<Shared>) {
    while !shared.stop.load(Ordering::SeqCst) {
        let client = match listener.accept() {
            Ok((client, _)) => client,
            Err(err) if err.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(TICK);
                continue;
            }
            Err(_) => continue,
        };
        if *shared.mode.lock().unwrap() == Mode::Drop {
            let _ = client.shutdown(Shutdown::Both);
            continue;
        }
        let Ok(server) = TcpStream::connect(target) else {
            let _ = client.shutdown(Shutdown::Both);
            continue;
        };
        let generation = shared.generation.load(Ordering::SeqCst);
        for (from, to, inbound) in [
            (client.try_clone(), server.try_clone(), true),
            (server.try_clone(), client.try_clone(), false),
        ] {
            let (Ok(from), Ok(to)) = (from, to) else {
                continue;
            };
            let shared = Arc::clone(shared);
            std::thread::spawn(move || pump(from, to, inbound, generation, &shared));
        }
    }
}

/// Whether the mode holds this direction.
fn is_held(shared: &Shared, inbound: bool) -> bool {
    match *shared.mode.lock().unwrap() {
        Mode::HoldInbound => inbound,
        Mode::HoldOutbound => !inbound,
        _ => false,
    }
}

/// Copies one direction of one connection, applying the mode to each chunk.
fn pump(mut from: TcpStream, mut to: TcpStream, inbound: bool, generation: u64, shared: &Shared) {
    let _ = from.set_read_timeout(Some(TICK));
    let _ = to.set_nodelay(true);
    let mut buf = vec![0u8; 64 * 1024];
    let reset = |from: &TcpStream, to: &TcpStream| {
        let _ = from.shutdown(Shutdown::Both);
        let _ = to.shutdown(Shutdown::Both);
    };
    loop {
        if shared.stop.load(Ordering::SeqCst)
            || shared.generation.load(Ordering::SeqCst) != generation
        {
            return reset(&from, &to);
        }
        // A held direction reads nothing: the sender's bytes wait in TCP's buffers.
        if is_held(shared, inbound) {
            std::thread::sleep(TICK);
            continue;
        }
        let n = match from.read(&mut buf) {
            Ok(0) => return reset(&from, &to),
            Ok(n) => n,
            Err(err) if matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                continue;
            }
            Err(_) => return reset(&from, &to),
        };
        // The fault may have begun while the read waited: hold what was read too.
        while is_held(shared, inbound) {
            if shared.stop.load(Ordering::SeqCst)
                || shared.generation.load(Ordering::SeqCst) != generation
            {
                return reset(&from, &to);
            }
            std::thread::sleep(TICK);
        }
        if let Mode::Delay(delay) = *shared.mode.lock().unwrap() {
            std::thread::sleep(delay);
        }
        if to.write_all(&buf[..n]).is_err() {
            return reset(&from, &to);
        }
    }
}

#[test]
fn the_proxy_forwards_delays_holds_one_way_and_drops() {
    use std::time::Instant;
    // An echo server behind the proxy.
    let echo = TcpListener::bind("127.0.0.1:0").unwrap();
    let target = echo.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for stream in echo.incoming() {
            let Ok(mut stream) = stream else { return };
            std::thread::spawn(move || {
                let mut buf = [0u8; 1024];
                while let Ok(n) = stream.read(&mut buf) {
                    if n == 0 || stream.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            });
        }
    });
    let proxy = FaultProxy::start(&target);
    let mut conn = TcpStream::connect(&proxy.addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let round_trip = |conn: &mut TcpStream| {
        let started = Instant::now();
        conn.write_all(b"ping").unwrap();
        let mut got = [0u8; 4];
        conn.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"ping");
        started.elapsed()
    };
    assert!(round_trip(&mut conn) < Duration::from_millis(200));
    proxy.set(Mode::Delay(Duration::from_millis(100)));
    let delayed = round_trip(&mut conn);
    assert!(delayed >= Duration::from_millis(200), "{delayed:?}");
    // Held either way: nothing comes back until the fault heals, then everything does.
    let mut got = [0u8; 4];
    for (mode, bytes) in [(Mode::HoldOutbound, b"held"), (Mode::HoldInbound, b"late")] {
        proxy.set(mode);
        conn.write_all(bytes).unwrap();
        conn.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        assert!(
            conn.read_exact(&mut got).is_err(),
            "{mode:?}: the held direction delivered"
        );
        proxy.set(Mode::Pass);
        conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        conn.read_exact(&mut got).unwrap();
        assert_eq!(&got, bytes);
    }
    // Dropped: the connection is reset, new ones are closed, and after healing all is well.
    proxy.set(Mode::Drop);
    std::thread::sleep(Duration::from_millis(100));
    assert!(matches!(conn.read(&mut got), Ok(0) | Err(_)));
    let mut refused = TcpStream::connect(&proxy.addr).unwrap();
    refused
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    assert!(matches!(refused.read(&mut got), Ok(0) | Err(_)));
    proxy.set(Mode::Pass);
    let mut healed = TcpStream::connect(&proxy.addr).unwrap();
    healed
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    round_trip(&mut healed);
}
