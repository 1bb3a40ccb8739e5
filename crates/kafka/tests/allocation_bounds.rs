//! Cairn's Kafka request decoders never allocate more than their input justifies, at every served
//! API and version, over random and hostile bodies (counts and lengths near 2^31 and 2^32,
//! tagged-field bombs). The `kafka-protocol` crate's own request decoder is the negative control:
//! on an 18-byte Metadata request it asks for a gigabyte, which is why Cairn does not use it for
//! requests (if this ever stops being true upstream, the control fails and says so).
#![allow(unsafe_code)] // the counting allocator, shared with cairn-protocol's test; see its SAFETY comments
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

#[path = "../../protocol/tests/support/counting.rs"]
mod counting;

use bytes::{BufMut, Bytes, BytesMut};
use cairn_kafka::Api;
use counting::{Counting, Rng, hostile, largest_allocation};
use kafka_protocol::protocol::Decodable;

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const SLACK_BYTES: usize = 64 * 1024;

fn with_header(api: Api, version: i16, body: &[u8]) -> Bytes {
    let mut frame = BytesMut::new();
    frame.put_i16(api.key);
    frame.put_i16(version);
    frame.put_i32(1);
    frame.put_i16(-1); // null client id
    if api.is_flexible(version) {
        frame.put_u8(0);
    }
    frame.put_slice(body);
    frame.freeze()
}

#[test]
fn request_decoders_allocate_in_proportion_to_their_input() {
    let mut rng = Rng(0x0ca1_2f00);
    for round in 0..3000 {
        let body = hostile(&mut rng);
        for api in Api::ALL {
            for version in api.served_from.max(api.min)..=api.max {
                let frame = with_header(*api, version, &body);
                let len = frame.len();
                let largest = largest_allocation(|| {
                    let _ = cairn_kafka::request::decode(frame);
                });
                assert!(
                    largest <= SLACK_BYTES + 64 * len,
                    "round {round}: {} v{version} allocated {largest} bytes for {len} input bytes",
                    api.name
                );
            }
        }
    }

    // Negative control: the same kind of input through kafka-protocol's decoder. Metadata v1: an
    // array of 2^24-1 topics in 4 bytes.
    let body = [0x00u8, 0xff, 0xff, 0xff];
    let ours = largest_allocation(|| {
        assert!(cairn_kafka::request::decode(with_header(Api::METADATA, 1, &body)).is_err());
    });
    let theirs = largest_allocation(|| {
        let mut buf = Bytes::copy_from_slice(&body);
        let _ = kafka_protocol::messages::MetadataRequest::decode(&mut buf, 1);
    });
    println!("4-byte Metadata body: ours allocated {ours} bytes, kafka-protocol {theirs}");
    assert!(ours <= SLACK_BYTES, "ours allocated {ours}");
    assert!(
        theirs > 256 << 20,
        "kafka-protocol's request decoder now allocates only {theirs} bytes for this input: \
         upstream may have bounded its arrays (PRs #152/#161/#200); see docs/kafka-compatibility.md"
    );
}
