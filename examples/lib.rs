//! Examples of services built on an embedded Cairn broker; see `order_pipeline.rs`.
#![forbid(unsafe_code)]
