//! Real `cairn broker` processes on ephemeral loopback ports, and the `cairn` command.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// The `cairn` command under test.
pub fn cairn_bin() -> &'static str {
    env!("CARGO_BIN_EXE_cairn-under-test")
}

/// A broker process, killed when dropped.
pub struct BrokerProcess {
    child: Option<Child>,
    /// Native-protocol address.
    pub addr: String,
    /// HTTP address.
    pub http: String,
    /// Kafka-protocol address.
    pub kafka: String,
    /// The broker's log (stderr).
    pub log: PathBuf,
}

impl BrokerProcess {
    /// Starts a broker on `data_dir` and waits until it listens.
    pub fn start(data_dir: &Path) -> BrokerProcess {
        BrokerProcess::start_with_config(data_dir, "")
    }

    /// Starts a broker with a TOML config file (flags still set the data dir and listeners).
    // The child is waited for by `kill9`, `terminate` or `Drop`.
    pub fn start_with_config(data_dir: &Path, toml: &str) -> BrokerProcess {
        BrokerProcess::start_at(data_dir, toml, "127.0.0.1:0")
    }

    /// Starts a broker whose native listener is `listen` (a fixed address lets clients
    /// reconnect to a restarted broker; `free_port` finds one).
    pub fn start_at(data_dir: &Path, toml: &str, listen: &str) -> BrokerProcess {
        BrokerProcess::start_with(data_dir, toml, listen, "127.0.0.1:0", &[])
    }

    /// Starts a broker with its native and Kafka listeners at fixed addresses and more flags
    /// (a cluster node's id, quorum and controller listener).
    pub fn start_with(
        data_dir: &Path,
        toml: &str,
        listen: &str,
        kafka_listen: &str,
        extra: &[String],
    ) -> BrokerProcess {
        BrokerProcess::start_in(None, data_dir, toml, listen, kafka_listen, extra)
    }

    /// [`BrokerProcess::start_with`] inside network namespace `netns` (`None`: this process's),
    /// its HTTP listener on the native listener's host.
    pub fn start_in(
        netns: Option<&str>,
        data_dir: &Path,
        toml: &str,
        listen: &str,
        kafka_listen: &str,
        extra: &[String],
    ) -> BrokerProcess {
        let args = ["--listen", listen, "--kafka-listen", kafka_listen];
        let host = listen
            .rsplit_once(':')
            .map_or("127.0.0.1", |(host, _)| host);
        let http = format!("{host}:0");
        BrokerProcess::spawn(netns, &http, data_dir, toml, &args, extra, |line| {
            let addr = line
                .strip_prefix("cairn broker listening on ")?
                .split(' ')
                .next()?;
            let kafka = line
                .split(", ")
                .find_map(|part| part.strip_suffix(" (kafka)"))?;
            Some((addr.to_string(), kafka.to_string()))
        })
    }

    /// Starts a controller-only node (`extra` carries `--roles controller`, its id, the quorum
    /// and its controller listener); `addr` is its controller address.
    pub fn start_controller(
        netns: Option<&str>,
        http: &str,
        data_dir: &Path,
        toml: &str,
        extra: &[String],
    ) -> BrokerProcess {
        BrokerProcess::spawn(netns, http, data_dir, toml, &[], extra, |line| {
            let addr = line
                .strip_prefix("cairn controller listening on ")?
                .split(' ')
                .next()?;
            Some((addr.to_string(), String::new()))
        })
    }

    /// Runs `cairn broker` (in network namespace `netns`, through `ip netns exec`, which execs it:
    /// the child is the broker itself) with its HTTP listener on `http`, and waits for the line
    /// saying where it listens; `parse` reads the (address, Kafka address) from it.
    // The child is waited for by `kill9`, `terminate` or `Drop`.
    #[allow(clippy::zombie_processes)]
    fn spawn(
        netns: Option<&str>,
        http: &str,
        data_dir: &Path,
        toml: &str,
        args: &[&str],
        extra: &[String],
        parse: impl Fn(&str) -> Option<(String, String)>,
    ) -> BrokerProcess {
        let config = data_dir.with_extension("toml");
        std::fs::write(&config, toml).unwrap();
        let log = data_dir.with_extension(format!(
            "{}.log",
            std::process::id() ^ rand::random::<u32>()
        ));
        let stderr = std::fs::File::create(&log).unwrap();
        let mut command = match netns {
            Some(ns) => {
                let mut command = Command::new("ip");
                command.args(["netns", "exec", ns, cairn_bin()]);
                command
            }
            None => Command::new(cairn_bin()),
        };
        let child = command
            .args(["broker", "--http-listen", http])
            .args(args)
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--config")
            .arg(&config)
            .args(extra)
            .env("RUST_LOG", "info,openraft=off")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let found = text.lines().find_map(|line| {
                let (addr, kafka) = parse(line)?;
                let http = line.split("http://").nth(1)?.split('/').next()?;
                Some((addr, kafka, http.to_string()))
            });
            if let Some((addr, kafka, http)) = found {
                return BrokerProcess {
                    child: Some(child),
                    addr,
                    http,
                    kafka,
                    log,
                };
            }
            assert!(Instant::now() < deadline, "broker did not start:\n{text}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Sends a signal (`STOP`, `CONT`, ...) by name.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap();
        assert!(status.success(), "kill -{name}");
    }

    /// SIGKILL, no cleanup.
    pub fn kill9(mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    /// SIGTERM, then waits for the exit.
    pub fn terminate(mut self) -> ExitStatus {
        let mut child = self.child.take().unwrap();
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "broker did not stop after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The broker's peak resident memory so far, in KiB (`VmHWM`).
    pub fn peak_rss_kib(&self) -> u64 {
        let pid = self.child.as_ref().unwrap().id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    /// GET a path from the HTTP listener; (status line, body).
    pub fn http_get(&self, path: &str) -> (String, String) {
        let mut stream = TcpStream::connect(&self.http).unwrap();
        write!(stream, "GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").unwrap();
        let mut text = String::new();
        stream.read_to_string(&mut text).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        (head.lines().next().unwrap().to_string(), body.to_string())
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A loopback address with a port free now and reserved for this test process, below the
/// kernel's ephemeral range (32768 and up on Linux): a port from that range can be taken by any
/// outgoing connection between now and the moment a restarted broker binds it again; ports
/// below it are only taken by listeners. Tests run as parallel processes, so a port is reserved
/// by a file naming the process (`$TMPDIR/cairn-test-ports/PORT`, created exclusively): no other
/// test picks it while this one runs, even while its broker is down between a kill and a
/// restart. A reservation whose process is gone is taken over.
pub fn free_port() -> String {
    use std::hash::{BuildHasher, Hasher};
    let dir = std::env::temp_dir().join("cairn-test-ports");
    let _ = std::fs::create_dir_all(&dir);
    let pid = std::process::id();
    for attempt in 0..1000u32 {
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u32(pid ^ attempt);
        let port = 20_000 + (hasher.finish() % 12_000) as u16;
        if !reserve_port(&dir, port, pid) {
            continue;
        }
        if let Ok(listener) = std::net::TcpListener::bind(("127.0.0.1", port)) {
            return listener.local_addr().unwrap().to_string();
        }
    }
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().to_string()
}

/// Reserves `port` for process `pid` (see [`free_port`]): true if it is now this process's.
fn reserve_port(dir: &Path, port: u16, pid: u32) -> bool {
    let path = dir.join(port.to_string());
    for _ in 0..2 {
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
        {
            Ok(mut file) => return file.write_all(pid.to_string().as_bytes()).is_ok(),
            Err(_) => {
                let owner = std::fs::read_to_string(&path).unwrap_or_default();
                let alive = owner.trim().parse::<u32>().is_ok_and(|owner| {
                    owner == pid || Path::new(&format!("/proc/{owner}")).exists()
                });
                if alive || owner.trim().is_empty() {
                    // In use (or being written by its new owner right now).
                    return false;
                }
                // Its process is gone: take it over (whoever removes it first).
                let _ = std::fs::remove_file(&path);
            }
        }
    }
    false
}

/// Runs `cairn ARGS` against `broker`, feeding `stdin`.
pub fn cairn(broker: &str, args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(cairn_bin())
        .arg("--bootstrap")
        .arg(broker)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    let stdin = stdin.to_string();
    let writer = std::thread::spawn(move || input.write_all(stdin.as_bytes()));
    let output = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    output
}

/// Stdout of a successful `cairn` run.
pub fn cairn_ok(broker: &str, args: &[&str], stdin: &str) -> String {
    let output = cairn(broker, args, stdin);
    assert!(
        output.status.success(),
        "cairn {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}
