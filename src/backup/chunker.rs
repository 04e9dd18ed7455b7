//! Content-defined chunking of a byte stream (FastCDC, 2020 variant).
//!
//! Cut points depend only on the bytes around them, so an insertion or change early in a table
//! dump moves chunk boundaries only locally and the rest of the dump produces the same chunks
//! (and blob ids) as yesterday. A cut is only taken once [`MAX_CHUNK`] bytes are available
//! after the chunk's start (or the stream ended), which makes the result identical to chunking
//! the whole stream at once however the input is split.
//!
//! Memory and time: the chunker keeps fewer than [`MAX_CHUNK`] bytes of its own between
//! pieces, and hands out the chunks of a piece one at a time as they are cut, each copied once
//! into a buffer of its own size. A piece of any size (one COPY row holding a value of
//! hundreds of MB) therefore costs the piece itself plus one chunk, and time linear in its
//! length.

use fastcdc::v2020::FastCDC;

pub const MIN_CHUNK: usize = 64 * 1024;
pub const AVG_CHUNK: usize = 256 * 1024;
pub const MAX_CHUNK: usize = 1024 * 1024;

/// Cuts a stream fed in pieces into chunks.
#[derive(Default)]
pub struct Chunker {
    /// The stream's bytes after the last cut, while fewer than `MAX_CHUNK` (more only when a
    /// [`Chunks`] was dropped before its end).
    pending: Vec<u8>,
}

impl Chunker {
    pub fn new() -> Self {
        Chunker::default()
    }

    /// Adds `data` to the stream: an iterator over the chunks that become final, cut lazily.
    /// What it has not handed out when dropped stays in the stream.
    pub fn push<'c>(&'c mut self, data: &'c [u8]) -> Chunks<'c> {
        Chunks {
            pending: &mut self.pending,
            rest: data,
            end: false,
        }
    }

    /// Ends the stream: an iterator over the remaining chunks.
    pub fn finish(&mut self) -> Chunks<'_> {
        Chunks {
            pending: &mut self.pending,
            rest: &[],
            end: true,
        }
    }
}

/// The chunks of one [`Chunker::push`] or [`Chunker::finish`], in stream order.
pub struct Chunks<'c> {
    pending: &'c mut Vec<u8>,
    /// The pushed bytes not yet moved into `pending` nor cut.
    rest: &'c [u8],
    /// The stream ends after `rest`: cut what remains even below `MAX_CHUNK`.
    end: bool,
}

/// Where the chunk starting at `data[0]` ends (`data` holds at least `MAX_CHUNK` bytes, or
/// the stream's last bytes).
fn cut_point(data: &[u8]) -> usize {
    let cdc = FastCDC::new(data, MIN_CHUNK as u32, AVG_CHUNK as u32, MAX_CHUNK as u32);
    let (_, cut) = cdc.cut(0, data.len());
    cut.clamp(1, data.len())
}

impl Iterator for Chunks<'_> {
    type Item = Vec<u8>;

    fn next(&mut self) -> Option<Vec<u8>> {
        loop {
            if self.pending.len() >= MAX_CHUNK || (self.end && !self.pending.is_empty()) {
                let cut = cut_point(self.pending);
                let chunk = self.pending[..cut].to_vec();
                self.pending.drain(..cut);
                return Some(chunk);
            }
            // Nothing carried over: cut straight from the piece, without copying it first.
            if self.pending.is_empty() && self.rest.len() >= MAX_CHUNK {
                let cut = cut_point(self.rest);
                let (chunk, rest) = self.rest.split_at(cut);
                self.rest = rest;
                return Some(chunk.to_vec());
            }
            if self.rest.is_empty() {
                return None;
            }
            let take = (MAX_CHUNK - self.pending.len()).min(self.rest.len());
            let (head, rest) = self.rest.split_at(take);
            self.pending.extend_from_slice(head);
            self.rest = rest;
        }
    }
}

impl Drop for Chunks<'_> {
    fn drop(&mut self) {
        // Keeps the stream whole when the caller stops early.
        self.pending.extend_from_slice(self.rest);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    fn chunk_all(input: &[u8], piece: usize) -> Vec<Vec<u8>> {
        let mut c = Chunker::new();
        let mut out = Vec::new();
        for p in input.chunks(piece) {
            out.extend(c.push(p));
        }
        out.extend(c.finish());
        out
    }

    #[test]
    fn independent_of_input_split_and_lossless() {
        let input = data(5 * MAX_CHUNK + 1234, 7);
        let a = chunk_all(&input, 8192);
        let b = chunk_all(&input, 1_000_003);
        assert_eq!(a, b);
        assert_eq!(a.concat(), input);
        assert!(a.iter().all(|c| c.len() <= MAX_CHUNK));
    }

    #[test]
    fn a_local_change_keeps_most_chunks() {
        let input = data(8 * MAX_CHUNK, 9);
        let mut changed = input.clone();
        changed[3 * MAX_CHUNK] ^= 0xff;
        let a = chunk_all(&input, 65536);
        let b = chunk_all(&changed, 65536);
        let same = b.iter().filter(|c| a.contains(c)).count();
        assert!(same + 2 >= b.len(), "{same} of {} chunks kept", b.len());
    }
}
