//! The five codecs of RecordBatch v2 (attributes bits 0-2), each decompression capped.
//!
//! Wire formats follow what Kafka clients produce and accept:
//! - gzip: an RFC 1952 gzip stream;
//! - snappy: the xerial "snappy-java" framing the Java client writes (`\x82SNAPPY\0`, then
//!   length-prefixed raw blocks); plain raw snappy, which librdkafka writes, is accepted too;
//! - lz4: the LZ4 frame format (Kafka >= 0.10, KIP-57), 64 KiB independent blocks;
//! - zstd: a zstd frame.

use std::io::{self, Read, Write};

use thiserror::Error;

use crate::limits::ZSTD_WINDOW_LOG_MAX;

/// The compression codec of a record batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Compression {
    /// Records stored as they are.
    #[default]
    None,
    /// gzip (deflate).
    Gzip,
    /// Snappy, xerial framing.
    Snappy,
    /// LZ4 frame.
    Lz4,
    /// Zstandard.
    Zstd,
}

impl Compression {
    /// All codecs, in attribute order.
    pub const ALL: [Compression; 5] = [
        Compression::None,
        Compression::Gzip,
        Compression::Snappy,
        Compression::Lz4,
        Compression::Zstd,
    ];

    /// The codec named by attributes bits 0-2.
    pub fn from_attributes(attributes: i16) -> Result<Compression, CompressionError> {
        match attributes & 0x07 {
            0 => Ok(Compression::None),
            1 => Ok(Compression::Gzip),
            2 => Ok(Compression::Snappy),
            3 => Ok(Compression::Lz4),
            4 => Ok(Compression::Zstd),
            other => Err(CompressionError::UnknownCodec { id: other as u8 }),
        }
    }

    /// The value of attributes bits 0-2 for this codec.
    pub fn attribute_bits(self) -> i16 {
        match self {
            Compression::None => 0,
            Compression::Gzip => 1,
            Compression::Snappy => 2,
            Compression::Lz4 => 3,
            Compression::Zstd => 4,
        }
    }

    /// The codec's name as Kafka configs spell it (`compression.type`).
    pub fn name(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Snappy => "snappy",
            Compression::Lz4 => "lz4",
            Compression::Zstd => "zstd",
        }
    }

    /// The codec with this config name.
    pub fn from_name(name: &str) -> Option<Compression> {
        Compression::ALL
            .into_iter()
            .find(|codec| codec.name() == name)
    }

    /// Compresses `input`. `None` returns a copy.
    pub fn compress(self, input: &[u8]) -> Result<Vec<u8>, CompressionError> {
        let io_error = |source| CompressionError::Io {
            codec: self,
            source,
        };
        match self {
            Compression::None => Ok(input.to_vec()),
            Compression::Gzip => {
                let mut encoder = flate2::write::GzEncoder::new(
                    Vec::with_capacity(input.len() / 2),
                    flate2::Compression::default(),
                );
                encoder.write_all(input).map_err(io_error)?;
                encoder.finish().map_err(io_error)
            }
            Compression::Snappy => xerial_compress(input).map_err(io_error),
            Compression::Lz4 => {
                let info = lz4_flex::frame::FrameInfo::new()
                    .block_size(lz4_flex::frame::BlockSize::Max64KB)
                    .block_mode(lz4_flex::frame::BlockMode::Independent);
                let mut encoder = lz4_flex::frame::FrameEncoder::with_frame_info(
                    info,
                    Vec::with_capacity(input.len() / 2),
                );
                encoder.write_all(input).map_err(io_error)?;
                encoder
                    .finish()
                    .map_err(|source| io_error(io::Error::other(source)))
            }
            Compression::Zstd => zstd::bulk::compress(input, 3).map_err(io_error),
        }
    }

    /// Decompresses `input`, failing once the output would pass `output_bytes_max`.
    pub fn decompress(
        self,
        input: &[u8],
        output_bytes_max: usize,
    ) -> Result<Vec<u8>, CompressionError> {
        let io_error = |source| CompressionError::Io {
            codec: self,
            source,
        };
        let out = match self {
            Compression::None => {
                if input.len() > output_bytes_max {
                    return Err(CompressionError::TooLarge {
                        codec: self,
                        max: output_bytes_max,
                    });
                }
                input.to_vec()
            }
            Compression::Gzip => {
                read_capped(self, flate2::read::GzDecoder::new(input), output_bytes_max)?
            }
            Compression::Snappy => xerial_decompress(input, output_bytes_max)?,
            Compression::Lz4 => read_capped(
                self,
                lz4_flex::frame::FrameDecoder::new(input),
                output_bytes_max,
            )?,
            Compression::Zstd => {
                let mut decoder = zstd::stream::read::Decoder::new(input).map_err(io_error)?;
                decoder
                    .window_log_max(ZSTD_WINDOW_LOG_MAX)
                    .map_err(io_error)?;
                read_capped(self, decoder, output_bytes_max)?
            }
        };
        Ok(out)
    }
}

/// A compression or decompression failure.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum CompressionError {
    /// Attributes bits 0-2 hold a value that names no codec.
    #[error("unknown compression codec id {id}")]
    UnknownCodec {
        /// The value of bits 0-2.
        id: u8,
    },
    /// The decompressed output would pass the cap.
    #[error("{} data decompresses to more than {max} bytes", codec.name())]
    TooLarge {
        /// The codec.
        codec: Compression,
        /// The cap.
        max: usize,
    },
    /// The compressed bytes are not valid for the codec.
    #[error("invalid {} data", codec.name())]
    Io {
        /// The codec.
        codec: Compression,
        /// What the codec reported.
        #[source]
        source: io::Error,
    },
}

fn read_capped(
    codec: Compression,
    reader: impl Read,
    output_bytes_max: usize,
) -> Result<Vec<u8>, CompressionError> {
    let mut out = Vec::new();
    let limit = u64::try_from(output_bytes_max)
        .unwrap_or(u64::MAX)
        .saturating_add(1);
    reader
        .take(limit)
        .read_to_end(&mut out)
        .map_err(|source| CompressionError::Io { codec, source })?;
    if out.len() > output_bytes_max {
        return Err(CompressionError::TooLarge {
            codec,
            max: output_bytes_max,
        });
    }
    Ok(out)
}

/// The xerial snappy-java stream header: magic, then version 1 and compatible version 1.
const XERIAL_HEADER: [u8; 16] = [
    0x82, b'S', b'N', b'A', b'P', b'P', b'Y', 0, 0, 0, 0, 1, 0, 0, 0, 1,
];
/// The Java client's xerial block size.
const XERIAL_BLOCK_BYTES: usize = 32 * 1024;

fn xerial_compress(input: &[u8]) -> io::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(XERIAL_HEADER.len() + input.len() / 2 + 64);
    out.extend_from_slice(&XERIAL_HEADER);
    let mut encoder = snap::raw::Encoder::new();
    for block in input.chunks(XERIAL_BLOCK_BYTES) {
        let compressed = encoder.compress_vec(block).map_err(io::Error::other)?;
        let len = u32::try_from(compressed.len()).map_err(io::Error::other)?;
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&compressed);
    }
    Ok(out)
}

fn xerial_decompress(input: &[u8], output_bytes_max: usize) -> Result<Vec<u8>, CompressionError> {
    let codec = Compression::Snappy;
    let invalid = |message: &str| CompressionError::Io {
        codec,
        source: io::Error::new(io::ErrorKind::InvalidData, message.to_string()),
    };
    let mut decoder = snap::raw::Decoder::new();
    let mut out = Vec::new();
    let mut decompress_block = |block: &[u8], out: &mut Vec<u8>| {
        // The raw snappy preamble states the block's decompressed length: check it against the
        // cap before allocating.
        let n_bytes = snap::raw::decompress_len(block).map_err(|source| CompressionError::Io {
            codec,
            source: io::Error::new(io::ErrorKind::InvalidData, source),
        })?;
        if out.len().saturating_add(n_bytes) > output_bytes_max {
            return Err(CompressionError::TooLarge {
                codec,
                max: output_bytes_max,
            });
        }
        let start = out.len();
        out.resize(start + n_bytes, 0);
        let written = decoder
            .decompress(block, out.get_mut(start..).unwrap_or_default())
            .map_err(|source| CompressionError::Io {
                codec,
                source: io::Error::new(io::ErrorKind::InvalidData, source),
            })?;
        out.truncate(start + written);
        Ok(())
    };
    match input.strip_prefix(&XERIAL_HEADER[..8]) {
        None => decompress_block(input, &mut out)?,
        Some(rest) => {
            // Skip the version and compatible-version words.
            let mut rest = rest
                .get(8..)
                .ok_or_else(|| invalid("truncated xerial header"))?;
            while !rest.is_empty() {
                let (len_bytes, tail) = rest
                    .split_first_chunk::<4>()
                    .ok_or_else(|| invalid("truncated xerial block length"))?;
                let len = u32::from_be_bytes(*len_bytes) as usize;
                let block = tail
                    .get(..len)
                    .ok_or_else(|| invalid("xerial block longer than its input"))?;
                decompress_block(block, &mut out)?;
                rest = tail.get(len..).unwrap_or_default();
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_codec_round_trips() {
        let input: Vec<u8> = (0..200_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect();
        for codec in Compression::ALL {
            let compressed = codec.compress(&input).unwrap();
            let output = codec.decompress(&compressed, input.len()).unwrap();
            assert_eq!(output, input, "{codec:?}");
        }
    }

    #[test]
    fn every_codec_enforces_the_cap() {
        // A compression bomb in miniature: 8 MiB of zeros compresses to almost nothing.
        let input = vec![0u8; 8 << 20];
        for codec in Compression::ALL {
            let compressed = codec.compress(&input).unwrap();
            let err = codec.decompress(&compressed, 1 << 20).unwrap_err();
            assert!(
                matches!(err, CompressionError::TooLarge { max, .. } if max == 1 << 20),
                "{codec:?}: {err}"
            );
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let garbage: Vec<u8> = (0..1000u32).map(|i| (i * 7919 % 256) as u8).collect();
        for codec in Compression::ALL.into_iter().skip(1) {
            assert!(codec.decompress(&garbage, 1 << 20).is_err(), "{codec:?}");
        }
        let mut xerial = XERIAL_HEADER.to_vec();
        xerial.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(Compression::Snappy.decompress(&xerial, 1 << 20).is_err());
    }

    #[test]
    fn raw_snappy_is_accepted() {
        let input = b"librdkafka writes raw snappy blocks".repeat(100);
        let raw = snap::raw::Encoder::new().compress_vec(&input).unwrap();
        assert_eq!(
            Compression::Snappy.decompress(&raw, 1 << 20).unwrap(),
            input
        );
    }
}
