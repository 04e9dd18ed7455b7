//! Content-defined chunking of a byte stream (FastCDC, 2020 variant).
//!
//! Cut points depend only on the bytes around them, so an insertion or change early in a table
//! dump moves chunk boundaries only locally and the rest of the dump produces the same chunks
//! (and blob ids) as yesterday. The chunker buffers at most [`MAX_CHUNK`] bytes plus one
//! input piece: a cut is only taken once `MAX_CHUNK` bytes are available after the chunk's
//! start (or the stream ended), which makes the result identical to chunking the whole stream
//! at once however the input is split.

use fastcdc::v2020::FastCDC;

pub const MIN_CHUNK: usize = 64 * 1024;
pub const AVG_CHUNK: usize = 256 * 1024;
pub const MAX_CHUNK: usize = 1024 * 1024;

/// Accumulates input and hands out complete chunks.
#[derive(Default)]
pub struct Chunker {
    buf: Vec<u8>,
}

impl Chunker {
    pub fn new() -> Self {
        Chunker::default()
    }

    /// Adds `data` and returns the chunks that are now final.
    pub fn push(&mut self, data: &[u8]) -> Vec<Vec<u8>> {
        self.buf.extend_from_slice(data);
        let mut out = Vec::new();
        while self.buf.len() >= MAX_CHUNK {
            out.push(self.take_one());
        }
        out
    }

    /// Ends the stream: the remaining chunks.
    pub fn finish(mut self) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        while !self.buf.is_empty() {
            out.push(self.take_one());
        }
        out
    }

    fn take_one(&mut self) -> Vec<u8> {
        let cdc = FastCDC::new(
            &self.buf,
            MIN_CHUNK as u32,
            AVG_CHUNK as u32,
            MAX_CHUNK as u32,
        );
        let (_, cut) = cdc.cut(0, self.buf.len());
        let cut = cut.clamp(1, self.buf.len());
        let rest = self.buf.split_off(cut);
        std::mem::replace(&mut self.buf, rest)
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
