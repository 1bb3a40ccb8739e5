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
        assert!(partition.log.recovery_report().clean);
        assert_eq!(partition.log.log_end_offset().0, 1_000);
        broker.shutdown().await;
    });
}
