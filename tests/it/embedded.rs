//! The broker embedded in a tokio application, with in-process client connections that skip TCP:
//! pipelined batches keep their order, acks=all works, and a clean shutdown reopens cleanly.

use std::time::Duration;

use cairn_broker::Broker;
use cairn_client::{
    Acks, Admin, Consumer, ConsumerConfig, Position, Producer, ProducerConfig, ProducerRecord,
};

#[test]
fn embedded_broker_with_in_process_clients() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let broker = Broker::builder()
            .data_dir(dir.path())
            .listen("127.0.0.1:0".parse().unwrap())
            .http_listen(None)
            .kafka_listen(None)
            .start()
            .await
            .unwrap();
        Admin::with_connection(broker.connection("admin"))
            .create_topic("events", 2, &[])
            .await
            .unwrap();
        // Tiny batches and many in flight: order must still hold per partition.
        let config = ProducerConfig {
            acks: Acks::All,
            linger: Duration::ZERO,
            batch_bytes: 64,
            max_in_flight: 8,
            ..ProducerConfig::default()
        };
        let producer = Producer::with_connection(broker.connection("producer"), config).unwrap();
        let mut deliveries = Vec::new();
        for i in 0..2_000u32 {
            let record = ProducerRecord::new("events", i.to_string()).partition(i % 2);
            deliveries.push(producer.send(record).await.unwrap());
        }
        for (i, delivery) in deliveries.into_iter().enumerate() {
            assert_eq!(delivery.await.unwrap().offset, Some(i as u64 / 2));
        }
        producer.close().await.unwrap();
        let mut consumer =
            Consumer::with_connection(broker.connection("consumer"), ConsumerConfig::default());
        consumer
            .assign("events", None, Position::Earliest)
            .await
            .unwrap();
        let mut seen = 0u32;
        while seen < 2_000 {
            for record in consumer.poll().await.unwrap() {
                let i: u32 = std::str::from_utf8(record.value.as_deref().unwrap())
                    .unwrap()
                    .parse()
                    .unwrap();
                assert_eq!(i % 2, record.partition);
                assert_eq!(u64::from(i / 2), record.offset);
                seen += 1;
            }
        }
        broker.shutdown().await;
        let broker = Broker::builder()
            .data_dir(dir.path())
            .listen("127.0.0.1:0".parse().unwrap())
            .http_listen(None)
            .kafka_listen(None)
            .start()
            .await
            .unwrap();
        let partition = broker.topics().partition("events", 1).unwrap();
        assert!(partition.recovery_report().clean);
        assert_eq!(partition.log_end_offset().0, 1_000);
        broker.shutdown().await;
    });
}

/// Two group consumers of an embedded broker, over in-process connections
/// (`RunningBroker::connector`), share a topic's partitions (round-robin assignor), process
/// every record, and commit.
#[test]
fn embedded_group_consumers_share_partitions() {
    use cairn_client::{Assignor, GroupConfig, GroupConsumer};
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let config = cairn_broker::BrokerConfig {
            group_initial_rebalance_delay_ms: 200,
            ..cairn_broker::BrokerConfig::default()
        };
        let broker = Broker::builder()
            .config(config)
            .data_dir(dir.path())
            .listen("127.0.0.1:0".parse().unwrap())
            .http_listen(None)
            .kafka_listen(None)
            .start()
            .await
            .unwrap();
        let admin = Admin::with_connection(broker.connection("admin"));
        admin.create_topic("jobs", 4, &[]).await.unwrap();
        let producer =
            Producer::with_connection(broker.connection("producer"), ProducerConfig::default())
                .unwrap();
        for i in 0..400u32 {
            let record = ProducerRecord::new("jobs", i.to_string()).key(i.to_string());
            drop(producer.send(record).await.unwrap());
        }
        producer.close().await.unwrap();
        let member = |name: &str| {
            let mut config = GroupConfig::new("workers", &["jobs"]);
            config.reset = Position::Earliest;
            config.assignors = vec![Assignor::RoundRobin];
            GroupConsumer::with_connector(broker.connector(name), config)
        };
        let (mut a, mut b) = (member("a").await.unwrap(), member("b").await.unwrap());
        let mut seen = std::collections::BTreeSet::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while seen.len() < 400 || a.assignment().len() != 2 || b.assignment().len() != 2 {
            assert!(std::time::Instant::now() < deadline, "{} seen", seen.len());
            let (ra, rb) = tokio::join!(a.poll(), b.poll());
            for record in ra.unwrap().into_iter().chain(rb.unwrap()) {
                seen.insert((record.partition, record.offset));
            }
        }
        // Round-robin over 4 partitions and members a < b: a gets 0 and 2, b gets 1 and 3.
        let partitions = |c: &GroupConsumer| -> Vec<u32> {
            let mut mine: Vec<u32> = c.assignment().iter().map(|(_, p)| *p).collect();
            mine.sort_unstable();
            mine
        };
        let (first, second) = if a.member_id() < b.member_id() {
            (&a, &b)
        } else {
            (&b, &a)
        };
        assert_eq!(
            (partitions(first), partitions(second)),
            (vec![0, 2], vec![1, 3])
        );
        a.close().await.unwrap();
        b.close().await.unwrap();
        let committed = admin.committed_offsets("workers").await.unwrap();
        let total: u64 = committed.iter().map(|(_, _, o)| o).sum();
        assert_eq!(total, 400, "{committed:?}");
        broker.shutdown().await;
    });
}

/// A group subscribed to a topic that does not exist yet: once it is created, the leader notices
/// at its next metadata check and the group reassigns, so its records are consumed.
#[test]
fn a_group_takes_up_a_topic_created_after_it_formed() {
    use cairn_client::{GroupConfig, GroupConsumer};
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let config = cairn_broker::BrokerConfig {
            group_initial_rebalance_delay_ms: 0,
            auto_create_topics: false,
            ..cairn_broker::BrokerConfig::default()
        };
        let broker = Broker::builder()
            .config(config)
            .data_dir(dir.path())
            .listen("127.0.0.1:0".parse().unwrap())
            .http_listen(None)
            .kafka_listen(None)
            .start()
            .await
            .unwrap();
        let mut config = GroupConfig::new("late", &["later"]);
        config.reset = Position::Earliest;
        config.metadata_refresh = Duration::from_millis(200);
        let mut member = GroupConsumer::with_connector(broker.connector("m"), config)
            .await
            .unwrap();
        for _ in 0..3 {
            assert!(member.poll().await.unwrap().is_empty());
        }
        assert!(member.assignment().is_empty());
        let admin = Admin::with_connection(broker.connection("admin"));
        admin.create_topic("later", 2, &[]).await.unwrap();
        let producer =
            Producer::with_connection(broker.connection("producer"), ProducerConfig::default())
                .unwrap();
        for i in 0..10u32 {
            let record = ProducerRecord::new("later", i.to_string()).key(i.to_string());
            drop(producer.send(record).await.unwrap());
        }
        producer.close().await.unwrap();
        let mut seen = 0;
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while seen < 10 {
            assert!(std::time::Instant::now() < deadline, "{seen} seen");
            seen += member.poll().await.unwrap().len();
        }
        assert_eq!(member.assignment().len(), 2);
        member.close().await.unwrap();
        broker.shutdown().await;
    });
}
