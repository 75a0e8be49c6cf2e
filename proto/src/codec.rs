//! The codec of every generated client and server: prost, as tonic's default, with smaller buffers.
//!
//! tonic starts each call's encode and decode buffers at 8 KiB. Parley's messages are mostly small (a
//! reservation, a reply delta of a few words), and a gateway holds one decoder per open completion
//! stream: at 10,000 streams the default alone is 80 MB. Buffers start at 1 KiB here and grow to fit a
//! larger message when one comes (tonic reserves a message's whole length before reading it).

use std::marker::PhantomData;

use tonic::codec::BufferSettings;
use tonic_prost::{ProstDecoder, ProstEncoder};

/// Where each call's buffers start.
const BUFFER_SIZE: usize = 1024;
/// How much a streaming encoder gathers before it yields (tonic's default).
const YIELD_THRESHOLD: usize = 32 * 1024;

fn settings() -> BufferSettings {
    BufferSettings::new(BUFFER_SIZE, YIELD_THRESHOLD)
}

/// `application/grpc+proto` via prost, with [`BUFFER_SIZE`] buffers.
#[derive(Debug, Clone, Copy)]
pub struct Codec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for Codec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> tonic::codec::Codec for Codec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(settings())
    }
}
