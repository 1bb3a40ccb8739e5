//! TLS on the listeners (docs/security.md): confluent-kafka over TLS and mutual TLS; a client
//! that does not trust the broker's certificate, one without a certificate where one is
//! required, and a plaintext client are all refused, and the broker goes on serving the others.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::broker_process::BrokerProcess;
use crate::cluster::metric;
use crate::kafka::{python, script};

/// A CA, a broker certificate it signed (for 127.0.0.1 and localhost), a client certificate it
/// signed, and another CA that signed nothing here, as PEM files in `dir`.
struct Pki {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
    other_ca: PathBuf,
    /// A broker certificate and key the other CA signed.
    other_cert: String,
    other_key: String,
}

fn pki(dir: &Path) -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let write = |name: &str, pem: String| {
        let path = dir.join(name);
        std::fs::write(&path, pem).unwrap();
        path
    };
    let authority = |name: &str| {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        (cert, key)
    };
    let (ca, ca_key) = authority("cairn test CA");
    let (other_ca, other_ca_key) = authority("someone else's CA");
    let signed = |names: Vec<String>, common_name: &str, by: (&rcgen::Certificate, &KeyPair)| {
        let mut params = CertificateParams::new(names).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, by.0, by.1).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let broker_names = || vec!["127.0.0.1".to_string(), "localhost".to_string()];
    let (cert, key) = signed(broker_names(), "broker", (&ca, &ca_key));
    let (other_cert, other_key) = signed(broker_names(), "broker", (&other_ca, &other_ca_key));
    let (client_cert, client_key) = signed(Vec::new(), "alice", (&ca, &ca_key));
    Pki {
        ca: write("ca.pem", ca.pem()),
        cert: write("broker.pem", cert),
        key: write("broker.key", key),
        client_cert: write("alice.pem", client_cert),
        client_key: write("alice.key", client_key),
        other_ca: write("other-ca.pem", other_ca.pem()),
        other_cert,
        other_key,
    }
}

/// What tests/kafka/tls.py reported: records produced and consumed, and the first error.
#[derive(Debug)]
struct Outcome {
    produced: u64,
    consumed: u64,
    error: Option<String>,
}

fn confluent(broker: &str, ca: &Path, client: Option<(&Path, &Path)>, topic: &str) -> Outcome {
    let mut command = Command::new(python());
    command
        .arg(script("tls.py"))
        .args(["--broker", broker, "--topic", topic, "--ca"])
        .arg(ca);
    if let Some((cert, key)) = client {
        command.arg("--cert").arg(cert).arg("--key").arg(key);
    }
    let out = command.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "tls.py failed\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    Outcome {
        produced: report["produced"].as_u64().unwrap(),
        consumed: report["consumed"].as_u64().unwrap(),
        error: report["error"].as_str().map(str::to_string),
    }
}

/// A producer connected over TLS.
async fn tls_producer(bootstrap: &str, tls: cairn_client::ClientTls) -> cairn_client::Producer {
    cairn_client::Producer::connect(
        bootstrap,
        cairn_client::ProducerConfig {
            tls: Some(tls),
            ..Default::default()
        },
    )
    .await
    .unwrap()
}

/// Sends `value` to partition 0 of `topic` and waits for its acknowledgement.
async fn send(producer: &cairn_client::Producer, topic: &str, value: &str) {
    producer
        .send(cairn_client::ProducerRecord::new(topic, value.to_string()).partition(0))
        .await
        .unwrap()
        .await
        .unwrap();
}

fn handshakes_failed(broker: &BrokerProcess) -> u64 {
    let (_, body) = broker.http_get("/metrics");
    metric(&body, "cairn_tls_handshakes_failed_total")
}

#[test]
fn kafka_clients_speak_tls_and_mutual_tls_and_everyone_else_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let toml = |client_ca: Option<&Path>| {
        let mut toml = format!(
            "tls_cert = {:?}\ntls_key = {:?}\n",
            pki.cert.display().to_string(),
            pki.key.display().to_string()
        );
        if let Some(ca) = client_ca {
            toml.push_str(&format!("tls_client_ca = {:?}\n", ca.display().to_string()));
        }
        toml
    };

    // TLS: a client that trusts the CA produces and consumes.
    let broker = BrokerProcess::start_with_config(&dir.path().join("tls"), &toml(None));
    let ok = confluent(&broker.kafka, &pki.ca, None, "over-tls");
    assert_eq!((ok.produced, ok.consumed), (100, 100), "{ok:?}");
    // One that trusts another CA gets nothing through and says why.
    let untrusted = confluent(&broker.kafka, &pki.other_ca, None, "untrusted");
    assert_eq!(untrusted.produced, 0, "{untrusted:?}");
    let why = untrusted.error.unwrap_or_default();
    assert!(why.contains("SSL") || why.contains("certificate"), "{why}");
    // A plaintext client (Cairn's native client, no TLS) is refused at the handshake.
    let before = handshakes_failed(&broker);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let plaintext = runtime.block_on(async {
        tokio::time::timeout(std::time::Duration::from_secs(10), async {
            cairn_client::Admin::connect(&broker.addr)
                .await?
                .list_topics()
                .await
        })
        .await
    });
    assert!(
        matches!(plaintext, Ok(Err(_))),
        "a plaintext client got through or hung: {plaintext:?}"
    );
    assert!(handshakes_failed(&broker) > before);
    // And the broker goes on serving TLS clients.
    let again = confluent(&broker.kafka, &pki.ca, None, "over-tls");
    assert_eq!(again.produced, 100, "{again:?}");
    drop(broker);

    // Mutual TLS: without a client certificate the handshake fails; with one the CA signed, all
    // goes through.
    let broker = BrokerProcess::start_with_config(&dir.path().join("mtls"), &toml(Some(&pki.ca)));
    let anonymous = confluent(&broker.kafka, &pki.ca, None, "mtls");
    assert_eq!(anonymous.produced, 0, "{anonymous:?}");
    let alice = confluent(
        &broker.kafka,
        &pki.ca,
        Some((&pki.client_cert, &pki.client_key)),
        "mtls",
    );
    assert_eq!((alice.produced, alice.consumed), (100, 100), "{alice:?}");
}

#[test]
fn a_broker_refuses_incomplete_or_unreadable_tls_settings_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let cairn = env!("CARGO_BIN_EXE_cairn-under-test");
    let start = |args: &[&str]| {
        let out = Command::new(cairn)
            .arg("broker")
            .args(["--data-dir"])
            .arg(dir.path().join("data"))
            .args(["--listen", "127.0.0.1:0", "--kafka-listen", "127.0.0.1:0"])
            .args(["--http-listen", "off"])
            .args(args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "started with {args:?}");
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let cert = pki.cert.to_str().unwrap();
    let key = pki.key.to_str().unwrap();
    let ca = pki.ca.to_str().unwrap();
    // A certificate without its key (clap says so), a key file that holds a certificate, a
    // client CA without TLS: each a clear error, no broker.
    assert!(start(&["--tls-cert", cert]).contains("--tls-key"));
    let wrong_key = start(&["--tls-cert", cert, "--tls-key", cert]);
    assert!(wrong_key.contains("tls_key"), "{wrong_key}");
    let no_tls = start(&["--tls-client-ca", ca]);
    assert!(no_tls.contains("tls_client_ca"), "{no_tls}");
    let missing = start(&["--tls-cert", "/nonexistent.pem", "--tls-key", key]);
    assert!(missing.contains("/nonexistent.pem"), "{missing}");
    // TLS listeners in a cluster without the CA brokers check each other with.
    let cluster = start(&[
        "--tls-cert",
        cert,
        "--tls-key",
        key,
        "--node-id",
        "1",
        "--controller-quorum",
        "1@127.0.0.1:1,2@127.0.0.1:2",
        "--controller-listen",
        "127.0.0.1:1",
    ]);
    assert!(cluster.contains("tls_ca"), "{cluster}");
}

#[test]
fn cairns_cli_and_client_speak_tls_and_mutual_tls() {
    use crate::broker_process::{cairn, cairn_ok};
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let path = |p: &Path| p.to_str().unwrap().to_string();
    let (ca, cert, key) = (path(&pki.ca), path(&pki.client_cert), path(&pki.client_key));
    let toml = format!(
        "tls_cert = {:?}\ntls_key = {:?}\ntls_client_ca = {:?}\n",
        path(&pki.cert),
        path(&pki.key),
        ca
    );
    let broker = BrokerProcess::start_with_config(&dir.path().join("data"), &toml);
    let b = &broker.addr;
    let mtls = ["--tls-ca", &ca, "--tls-cert", &cert, "--tls-key", &key];
    // The CLI with the CA and a client certificate: create, produce, consume.
    let with = |args: &[&str]| -> Vec<String> {
        mtls.iter()
            .chain(args)
            .map(|s| s.to_string())
            .collect::<Vec<_>>()
    };
    let args = with(&["topic", "create", "secure", "--partitions", "1"]);
    cairn_ok(b, &args.iter().map(String::as_str).collect::<Vec<_>>(), "");
    let args = with(&["produce", "secure"]);
    cairn_ok(
        b,
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        "one\ntwo\n",
    );
    let args = with(&["consume", "secure", "--from", "earliest", "--count", "2"]);
    let out = cairn_ok(b, &args.iter().map(String::as_str).collect::<Vec<_>>(), "");
    assert!(out.contains("one") && out.contains("two"), "{out}");
    // Without a client certificate, without TLS, or trusting the wrong CA: refused, with a reason.
    for (args, why) in [
        (
            vec!["--tls-ca", ca.as_str(), "topic", "list"],
            "CertificateRequired",
        ),
        (vec!["topic", "list"], "onnect"),
        (
            vec!["--tls-ca", pki.other_ca.to_str().unwrap(), "topic", "list"],
            "TLS",
        ),
    ] {
        let out = cairn(b, &args, "");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} got through: {stderr}");
        assert!(stderr.contains(why), "{args:?}: {stderr}");
    }
    // The library: a producer and a consumer configured with the same files.
    let tls =
        cairn_client::ClientTls::from_pem_files(&pki.ca, Some((&pki.client_cert, &pki.client_key)))
            .unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let producer = tls_producer(b, tls.clone()).await;
        send(&producer, "secure", "three").await;
        producer.close().await.unwrap();
        let mut consumer = cairn_client::Consumer::connect(
            b,
            cairn_client::ConsumerConfig {
                tls: Some(tls),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        consumer
            .assign("secure", None, cairn_client::Position::Earliest)
            .await
            .unwrap();
        let mut values = Vec::new();
        while values.len() < 3 {
            for record in consumer.poll().await.unwrap() {
                values.push(String::from_utf8_lossy(&record.value.unwrap_or_default()).to_string());
            }
        }
        assert_eq!(values, ["one", "two", "three"]);
    });
}

#[test]
fn a_cluster_with_tls_listeners_replicates_over_tls() {
    use crate::cluster::TestCluster;
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let path = |p: &Path| p.to_str().unwrap().to_string();
    // Mutual TLS everywhere: followers present their broker certificate to the leader.
    let toml = format!(
        "tls_cert = {:?}\ntls_key = {:?}\ntls_client_ca = {:?}\ntls_ca = {:?}\n",
        path(&pki.cert),
        path(&pki.key),
        path(&pki.ca),
        path(&pki.ca)
    );
    let cluster = TestCluster::start(3, &toml);
    let bootstrap = cluster.bootstrap_except(None);
    let tls =
        cairn_client::ClientTls::from_pem_files(&pki.ca, Some((&pki.client_cert, &pki.client_key)))
            .unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let admin = cairn_client::Admin::connect_tls(&bootstrap, Some(tls.clone()))
            .await
            .unwrap();
        admin
            .create_topic_replicated("replicated", 3, Some(3), &[])
            .await
            .unwrap();
        // acks=all needs min.insync.replicas (2) in sync: followers fetching over TLS.
        let producer = cairn_client::Producer::connect(
            &bootstrap,
            cairn_client::ProducerConfig {
                tls: Some(tls.clone()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let mut deliveries = Vec::new();
        for i in 0..300u32 {
            let record =
                cairn_client::ProducerRecord::new("replicated", format!("r{i}")).partition(i % 3);
            deliveries.push(producer.send(record).await.unwrap());
        }
        for delivery in deliveries {
            delivery.await.unwrap();
        }
        producer.close().await.unwrap();
        // Every replica caught up: each partition's ISR is all three, its high watermark 100.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let topics = admin.describe_topics(&["replicated".into()]).await.unwrap();
            let partitions = &topics[0].partitions;
            if partitions
                .iter()
                .all(|p| p.isr.len() == 3 && p.high_watermark == 100)
            {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "replicas not in sync over TLS: {partitions:?}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    });
    let (_, metrics) = cluster.process(2).http_get("/metrics");
    assert_eq!(metric(&metrics, "cairn_tls_handshakes_failed_total"), 0);
}

#[test]
fn sighup_reloads_the_certificate_for_new_connections_and_keeps_open_ones() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    // The broker's own copies of its certificate and key, replaced in place below.
    let (cert, key) = (dir.path().join("live.pem"), dir.path().join("live.key"));
    std::fs::copy(&pki.cert, &cert).unwrap();
    std::fs::copy(&pki.key, &key).unwrap();
    let toml = format!(
        "tls_cert = {:?}\ntls_key = {:?}\n",
        cert.to_str().unwrap(),
        key.to_str().unwrap()
    );
    let broker = BrokerProcess::start_with_config(&dir.path().join("data"), &toml);
    let b = broker.addr.clone();
    let trusting = |ca: &Path| cairn_client::ClientTls::from_pem_files(ca, None).unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let lists = |ca: &Path| {
        let tls = trusting(ca);
        runtime.block_on(async {
            cairn_client::Admin::connect_tls(&b, Some(tls))
                .await?
                .list_topics()
                .await
        })
    };
    // A producer connected under the first certificate.
    let producer = runtime.block_on(async {
        let producer = tls_producer(&b, trusting(&pki.ca)).await;
        send(&producer, "reload", "before").await;
        producer
    });
    assert!(lists(&pki.other_ca).is_err());

    // Renewed by another CA: written in place, then SIGHUP.
    std::fs::write(&cert, &pki.other_cert).unwrap();
    std::fs::write(&key, &pki.other_key).unwrap();
    broker.signal("HUP");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while lists(&pki.other_ca).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "the new certificate was not taken"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let refused = lists(&pki.ca).unwrap_err().to_string();
    assert!(refused.contains("UnknownIssuer"), "{refused}");
    // The connection opened before goes on.
    runtime.block_on(send(&producer, "reload", "after"));

    // A broken renewal (a key that is not the certificate's) is refused; the current one stays.
    std::fs::write(&key, std::fs::read_to_string(&pki.key).unwrap()).unwrap();
    broker.signal("HUP");
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert!(lists(&pki.other_ca).is_ok());
    let log = std::fs::read_to_string(&broker.log).unwrap();
    assert!(log.contains("TLS certificate not reloaded"), "{log}");
    runtime.block_on(producer.close()).unwrap();
}
