//! An event-driven order pipeline on an embedded Cairn broker, all in one process:
//!
//! - the **order service** produces `orders` events, keyed by customer (one customer, one
//!   partition, so a customer's orders stay in order);
//! - the **shipping service** consumes `orders` and produces a `shipments` event for each;
//! - the **notifier** consumes `shipments` and prints them.
//!
//! Run it with `cargo run --example order_pipeline`. The data lives in a temporary directory; set
//! `ORDER_PIPELINE_DATA=path` to keep it and see the records survive a second run.
#![forbid(unsafe_code)]

use std::time::Duration;

use anyhow::Context;
use cairn_broker::Broker;
use cairn_client::ErrorCode;
use cairn_client::{
    Acks, Admin, Consumer, ConsumerConfig, Position, Producer, ProducerConfig, ProducerRecord,
};

const N_ORDERS: u64 = 100;
const CUSTOMERS: [&str; 5] = ["ada", "grace", "edsger", "barbara", "ken"];

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let temp;
    let data_dir = match std::env::var_os("ORDER_PIPELINE_DATA") {
        Some(dir) => dir.into(),
        None => {
            temp = tempfile::tempdir()?;
            temp.path().to_path_buf()
        }
    };
    // The whole broker, in this process. Its TCP listener is there for other processes
    // (`cairn consume orders --bootstrap ...`); the services below skip TCP.
    let broker = Broker::builder()
        .data_dir(&data_dir)
        .listen("127.0.0.1:0".parse()?)
        .http_listen(None)
        .kafka_listen(None)
        .start()
        .await
        .context("starting the embedded broker")?;
    println!(
        "embedded broker on {} (data in {})",
        broker.native_addr(),
        data_dir.display()
    );

    let admin = Admin::with_connection(broker.connection("setup"));
    for topic in ["orders", "shipments"] {
        if let Err(err) = admin.create_topic(topic, 3, &[]).await {
            // Already there from an earlier run is fine.
            if err.code() != Some(ErrorCode::TOPIC_ALREADY_EXISTS) {
                return Err(err.into());
            }
        }
    }
    let orders_start = end_offsets(&broker, "orders").await?;
    let shipments_start = end_offsets(&broker, "shipments").await?;

    let shipping = tokio::spawn(shipping_service(
        broker.connection("shipping"),
        orders_start,
    ));
    let notifier = tokio::spawn(notifier(broker.connection("notifier"), shipments_start));

    // The order service.
    let orders = Producer::with_connection(
        broker.connection("orders"),
        ProducerConfig {
            acks: Acks::All,
            linger: Duration::from_millis(2),
            ..ProducerConfig::default()
        },
    )?;
    for n in 0..N_ORDERS {
        let customer = CUSTOMERS
            .iter()
            .cycle()
            .nth(n as usize)
            .copied()
            .unwrap_or("guest");
        let record = ProducerRecord::new("orders", format!("order-{n}: 1 x widget"))
            .key(customer)
            .header("source", "web");
        orders.send(record).await?;
    }
    orders.close().await?;

    let shipped = shipping.await??;
    let notified = notifier.await??;
    println!("{N_ORDERS} orders placed, {shipped} shipped, {notified} notifications");
    broker.shutdown().await;
    Ok(())
}

/// The next offset of every partition of `topic`: where this run's services start reading.
async fn end_offsets(
    broker: &cairn_broker::RunningBroker,
    topic: &str,
) -> anyhow::Result<Vec<(u32, u64)>> {
    let consumer =
        Consumer::with_connection(broker.connection("offsets"), ConsumerConfig::default());
    let mut ends = Vec::new();
    for partition in 0..3 {
        ends.push((partition, consumer.end_offset(topic, partition).await?));
    }
    Ok(ends)
}

async fn shipping_service(
    conn: cairn_client::Connection,
    from: Vec<(u32, u64)>,
) -> anyhow::Result<u64> {
    let mut orders = Consumer::with_connection(conn.clone(), ConsumerConfig::default());
    for (partition, offset) in from {
        orders
            .assign("orders", Some(vec![partition]), Position::Offset(offset))
            .await?;
    }
    let shipments = Producer::with_connection(conn, ProducerConfig::default())?;
    let mut shipped = 0;
    while shipped < N_ORDERS {
        for order in orders.poll().await? {
            let customer = order.key.clone().unwrap_or_default();
            let text =
                String::from_utf8_lossy(order.value.as_deref().unwrap_or_default()).into_owned();
            let shipment = format!(
                "shipment for {text} (order {}-{}@{})",
                order.topic, order.partition, order.offset
            );
            shipments
                .send(ProducerRecord::new("shipments", shipment).key(customer))
                .await?;
            shipped += 1;
        }
    }
    shipments.close().await?;
    Ok(shipped)
}

async fn notifier(conn: cairn_client::Connection, from: Vec<(u32, u64)>) -> anyhow::Result<u64> {
    let mut shipments = Consumer::with_connection(conn, ConsumerConfig::default());
    for (partition, offset) in from {
        shipments
            .assign("shipments", Some(vec![partition]), Position::Offset(offset))
            .await?;
    }
    let mut seen = 0;
    while seen < N_ORDERS {
        for shipment in shipments.poll().await? {
            let customer =
                String::from_utf8_lossy(shipment.key.as_deref().unwrap_or_default()).into_owned();
            if seen % 20 == 0 {
                println!(
                    "notify {customer}: {}",
                    String::from_utf8_lossy(shipment.value.as_deref().unwrap_or_default())
                );
            }
            seen += 1;
        }
    }
    Ok(seen)
}
