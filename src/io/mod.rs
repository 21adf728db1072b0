//! The streaming kit (after coreos-installer's `src/io/`): small composable `Read`/`Write`
//! adapters. A layer streams through `ChannelReader -> LimitReader (hashed on the download task)
//! -> CountingReader -> decoder -> RatioLimit -> SniffReader -> tar`; files are written through
//! `HashWriter -> BufWriter -> WritebackFile`, their bytes teed to a check `Beside` the writer
//! (a kernel check reads them through `ForwardSeek`); the format checks read through `Source` and
//! `Capped`.

mod beside;
mod channel;
mod decode;
mod hash;
mod limit;
mod sniff;
mod source;
mod writeback;

pub use beside::{Beside, ForwardSeek};
pub use channel::ChannelReader;
pub use decode::{gzip_member, xz_stream, zstd_frame, Compression};
pub use hash::{HashReader, HashWriter};
pub use limit::{CountingReader, LimitReader, RatioLimit};
pub use sniff::{sniff_format, SniffReader};
pub(crate) use source::{is_limit, read_full, skip_exact, skip_zeros, Budget, Capped, Source};
pub use writeback::WritebackFile;
