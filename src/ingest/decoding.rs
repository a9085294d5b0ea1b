//! The decode stage: raw messages decoded on several threads, handed on in their stream order.
//!
//! ```text
//!  raw ──▶ dealer task ──batch 0──▶ decoder 0 ──▶ ┐
//!                      ──batch 1──▶ decoder 1 ──▶ ├─ taken back in the same turn ──▶ decode loop
//!                      ──batch 2──▶ decoder 0 ──▶ ┘
//! ```
//!
//! The dealer takes what the source's channel holds, up to [`BATCH`] messages or
//! [`BATCH_BYTES`], and deals the batches to the decoders in turn; the loop takes the decoded batches back in that same turn,
//! so the events reach the checks, the deduplication and the batcher exactly in the order the
//! source gave them (cursors, dedupe and the cut-over depend on it). Decoding is a pure function
//! of a message's bytes: nothing in the loop's state goes into it.
//!
//! Every channel holds one batch: with `n` decoders at most `3n + 1` batches are between the
//! source's channel and the loop (one waiting, one decoding, one decoded per decoder, one in the
//! dealer's hands), and the used batches the loop gives back wait for their decoder's next
//! batch to be freed (no more than the decoder made since: two or three), so the stage's
//! memory is bounded. When the loop stops taking batches (over
//! its memory budget, or shut down), the decoders wait, then the dealer, then the source.

use super::IngestError;
use crate::decode::events::{DecodeOptions, FrameDecoder};
use crate::decode::jetstream::{JetstreamDecoder, JetstreamOptions};
use crate::model::{Decoded, SourceKind};
use crate::source::{Payload, RawMessage};
use tokio::sync::mpsc;

/// Most messages in a batch. A batch is what the source's channel holds when the dealer looks,
/// up to this many messages or [`BATCH_BYTES`]: large enough that the hand-overs (a thread
/// woken at each) cost little beside the decoding, small enough to keep the stage's memory
/// small. With batches of 128 messages, a 3M-line Jetstream file took 128,235 context switches
/// against 53,300 decoding in the loop, and 1.5 s more CPU.
pub(super) const BATCH: usize = 1024;

/// A batch stops growing at this many bytes of payload (about 90 firehose frames of 5.5 KB,
/// 1,000 Jetstream lines of 500 B). A 200,000-frame capture on 2 cores, two runs each: 64 KiB
/// 2.72–3.55 s, 256 KiB 2.23–2.27, 512 KiB 2.12–2.14, 1 MiB 2.16–2.23 (peak RSS 131–134,
/// 135–137, 137–139, 143–146 MiB).
pub(super) const BATCH_BYTES: usize = 512 << 10;

fn payload_len(m: &RawMessage) -> usize {
    match &m.payload {
        Payload::Frame(b) | Payload::Line(b) => b.len(),
        Payload::Undecodable(e) => e.raw.len(),
    }
}

/// One batch, decoded: each message with the outputs it gave, in order.
pub(super) struct DecodedBatch {
    pub messages: Vec<RawMessage>,
    /// `ends[i]`: where message `i`'s outputs end in `outputs` (they start where `i - 1`'s end).
    pub ends: Vec<usize>,
    pub outputs: Vec<Decoded>,
    /// The decoder that made it, which takes it back (see [`DecodeStage::give_back`]).
    decoder: usize,
}

/// Both decoders, reusing their buffers.
pub(super) struct Decoders {
    frames: FrameDecoder,
    lines: JetstreamDecoder,
}

impl Decoders {
    fn new(verify_hashes: bool) -> Self {
        Decoders {
            frames: FrameDecoder::new(DecodeOptions { verify_hashes }),
            lines: JetstreamDecoder::new(JetstreamOptions::default()),
        }
    }

    fn decode_one(&mut self, msg: &RawMessage, out: &mut Vec<Decoded>) {
        match &msg.payload {
            Payload::Frame(f) => self.frames.decode(f, out),
            Payload::Line(l) => out.push(self.lines.decode(l)),
            Payload::Undecodable(e) => out.push(Decoded::Error(e.clone())),
        }
    }

    /// The outputs of the message before, emptied from `out`: a Jetstream commit's strings
    /// are reused for the next line's.
    fn recycle(&mut self, out: &mut Vec<Decoded>) {
        for d in out.drain(..) {
            self.lines.recycle(d);
        }
    }

    fn decode(
        &mut self,
        messages: Vec<RawMessage>,
        decoder: usize,
        spare: Option<DecodedBatch>,
    ) -> DecodedBatch {
        let (mut ends, mut outputs) = match spare {
            Some(b) => (b.ends, b.outputs),
            None => (
                Vec::with_capacity(messages.len()),
                Vec::with_capacity(messages.len() + messages.len() / 4),
            ),
        };
        ends.clear();
        outputs.clear();
        for msg in &messages {
            self.decode_one(msg, &mut outputs);
            ends.push(outputs.len());
        }
        DecodedBatch {
            messages,
            ends,
            outputs,
            decoder,
        }
    }
}

/// Where the loop's messages come from.
pub(super) enum DecodeStage {
    /// Raw messages, decoded one at a time on the loop's own thread, each freed before the
    /// next is decoded.
    Here {
        raw: mpsc::Receiver<RawMessage>,
        decoders: Box<Decoders>,
        decoded: Vec<Decoded>,
    },
    /// Batches decoded on threads of their own, taken back in the order the dealer gave them
    /// out.
    Threads {
        outputs: Vec<mpsc::Receiver<Result<DecodedBatch, String>>>,
        /// Used batches, back to the decoder that made them.
        used: Vec<std::sync::mpsc::Sender<DecodedBatch>>,
        next: usize,
    },
}

/// What the loop gets from the stage.
pub(super) enum Incoming {
    /// Messages to decode on the loop's thread ([`DecodeStage::decode_here`]).
    Raw(Vec<RawMessage>),
    /// A batch decoded elsewhere, to give back once processed ([`DecodeStage::give_back`]).
    Decoded(DecodedBatch),
}

/// How many decoder threads: `configured`; with 0, one per core the process may use (at most
/// 4) for firehose frames, and none for Jetstream lines and repository records, which are
/// decoded on the loop's thread. Measured on 2 cores (release builds, 2026-12-05, runs
/// alternated): a 200,000-frame firehose capture 2.60–2.69 s → 2.12–2.14 s with two decoders;
/// a 3M-line Jetstream file 10.76 s → 11.27 s (a line takes 2–3 µs to decode, and a thousand
/// events' values alive at once, made on one thread and freed on another, cost glibc's
/// allocator more than the decoding); 3 or 4 decoders on 2 cores gave nothing more.
pub fn decoder_count(configured: usize, source: SourceKind) -> usize {
    if configured > 0 {
        return configured;
    }
    match source {
        SourceKind::Firehose => match std::thread::available_parallelism() {
            Ok(n) => n.get().min(4),
            Err(e) => {
                tracing::warn!(error = %e, "the number of cores is unknown: one decoder thread (set source.decode_threads)");
                1
            }
        },
        SourceKind::Jetstream | SourceKind::Repo => 0,
    }
}

impl DecodeStage {
    /// With `decoders` = 0, decoding on the loop's thread; else starts that many decoder
    /// threads and the dealer task on the current runtime.
    pub(super) fn start(
        mut raw: mpsc::Receiver<RawMessage>,
        decoders: usize,
        verify_hashes: bool,
    ) -> Result<Self, IngestError> {
        if decoders == 0 {
            return Ok(DecodeStage::Here {
                raw,
                decoders: Box::new(Decoders::new(verify_hashes)),
                decoded: Vec::with_capacity(64),
            });
        }
        let n = decoders;
        let mut inputs = Vec::with_capacity(n);
        let mut outputs = Vec::with_capacity(n);
        let mut used = Vec::with_capacity(n);
        for i in 0..n {
            let (in_tx, mut in_rx) = mpsc::channel::<Vec<RawMessage>>(1);
            let (out_tx, out_rx) = mpsc::channel::<Result<DecodedBatch, String>>(1);
            let (used_tx, used_rx) = std::sync::mpsc::channel::<DecodedBatch>();
            std::thread::Builder::new()
                .name(format!("atlake-decode-{i}"))
                .spawn(move || {
                    let mut d = Decoders::new(verify_hashes);
                    while let Some(batch) = in_rx.blocking_recv() {
                        // what the loop is done with is freed here, by the thread that
                        // allocated it: freed on the loop's thread, the decoded values went
                        // back to this thread's heap under its lock, and the heaps of both
                        // threads grew (3M Jetstream lines: 9.7 s became 13.5 s)
                        let mut spare = None;
                        while let Ok(b) = used_rx.try_recv() {
                            spare = Some(b);
                        }
                        if let Some(b) = &mut spare {
                            b.outputs.clear();
                            b.messages.clear();
                        }
                        // a decoder that panics (a bug: decoders return errors) must not look
                        // like the end of the stream to the loop
                        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            d.decode(batch, i, spare)
                        }))
                        .map_err(|p| {
                            match (p.downcast_ref::<&str>(), p.downcast_ref::<String>()) {
                                (Some(why), _) => format!("decoder {i} panicked: {why}"),
                                (None, Some(why)) => format!("decoder {i} panicked: {why}"),
                                (None, None) => {
                                    format!("decoder {i} panicked (a payload that is not text)")
                                }
                            }
                        });
                        let failed = r.is_err();
                        if out_tx.blocking_send(r).is_err() || failed {
                            return;
                        }
                    }
                })
                .map_err(|e| IngestError::Broken(format!("cannot start decoder {i}: {e}")))?;
            inputs.push(in_tx);
            outputs.push(out_rx);
            used.push(used_tx);
        }
        tokio::spawn(async move {
            let mut turn = 0;
            loop {
                let Some(first) = raw.recv().await else {
                    // the source ended: dropping the inputs ends the decoders, whose closed
                    // outputs end the loop after the last batch
                    return;
                };
                // what is there now, up to a batch: never a wait for more
                let mut bytes = payload_len(&first);
                let mut batch = Vec::with_capacity(BATCH);
                batch.push(first);
                while batch.len() < BATCH && bytes < BATCH_BYTES {
                    match raw.try_recv() {
                        Ok(m) => {
                            bytes += payload_len(&m);
                            batch.push(m);
                        }
                        Err(_) => break,
                    }
                }
                if inputs[turn].send(batch).await.is_err() {
                    // the loop stopped taking batches: stop reading, so the source stops
                    return;
                }
                turn = (turn + 1) % inputs.len();
            }
        });
        Ok(DecodeStage::Threads {
            outputs,
            used,
            next: 0,
        })
    }

    /// The next messages in stream order; `None` once the source ended and every message was
    /// taken. Cancel-safe: a call dropped before it returns takes nothing.
    pub(super) async fn recv(&mut self) -> Option<Result<Incoming, IngestError>> {
        match self {
            DecodeStage::Here { raw, .. } => {
                let mut buf = Vec::with_capacity(256);
                if raw.recv_many(&mut buf, 256).await == 0 {
                    return None;
                }
                Some(Ok(Incoming::Raw(buf)))
            }
            DecodeStage::Threads { outputs, next, .. } => {
                // the dealer gives batches out in turn, so the first decoder in turn with
                // nothing more is the end: every batch after it would have gone to it
                let got = outputs[*next].recv().await?;
                *next = (*next + 1) % outputs.len();
                Some(got.map(Incoming::Decoded).map_err(|why| {
                    metrics::counter!("atlake_broken_invariants_total").increment(1);
                    tracing::error!(%why, "a decoder failed");
                    IngestError::Broken(why)
                }))
            }
        }
    }

    /// Decodes one message on this thread, freeing the previous one's outputs; an error when
    /// the stage decodes on threads of its own (the loop never asks that: it got no raw
    /// messages from it).
    pub(super) fn decode_here(&mut self, msg: &RawMessage) -> Result<&mut [Decoded], IngestError> {
        match self {
            DecodeStage::Here {
                decoders, decoded, ..
            } => {
                decoders.recycle(decoded);
                decoders.decode_one(msg, decoded);
                Ok(decoded)
            }
            DecodeStage::Threads { .. } => Err(IngestError::Broken(
                "a raw message reached the loop while decoders run on their own threads".into(),
            )),
        }
    }

    /// A batch the loop is done with, back to its decoder, which frees what it holds and
    /// reuses its lists. Only memory goes back: every row of the batch is in the batcher or
    /// the quarantine already. A decoder that has ended (the stream ended, or it failed, which
    /// [`Self::recv`] reports) cannot take it, and it is freed here.
    pub(super) fn give_back(&self, batch: DecodedBatch) {
        if let DecodeStage::Threads { used, .. } = self
            && let Some(tx) = used.get(batch.decoder)
            && let Err(std::sync::mpsc::SendError(batch)) = tx.send(batch)
        {
            drop(batch);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Cursor, EventData};

    fn line(i: i64) -> RawMessage {
        let l = format!(
            r#"{{"did":"did:plc:aaaaaaaaaaaaaaaaaaaaaaaa","time_us":{},"kind":"commit","commit":{{"rev":"3l3qo2vutsw2b","operation":"delete","collection":"app.bsky.feed.like","rkey":"3l3qo2vuowo2b"}}}}"#,
            1_700_000_000_000_000 + i
        );
        RawMessage {
            payload: Payload::Line(bytes::Bytes::from(l)),
            cursor: Cursor::time_us(1_700_000_000_000_000 + i).ok(),
        }
    }

    async fn run(n_messages: i64, decoders: usize) -> Vec<i64> {
        let (tx, rx) = mpsc::channel(16);
        let mut stage = DecodeStage::start(rx, decoders, true).unwrap();
        let feeder = tokio::spawn(async move {
            for i in 0..n_messages {
                tx.send(line(i)).await.unwrap();
            }
        });
        let mut times = Vec::new();
        let mut check = |m: &RawMessage, d: &[Decoded]| {
            assert_eq!(d.len(), 1);
            let Decoded::Event(env) = &d[0] else {
                panic!("not an event: {d:?}")
            };
            assert!(matches!(env.event.data, EventData::Commit(_)));
            assert_eq!(m.cursor.map(|c| c.value()), Some(env.time_us));
            times.push(env.time_us - 1_700_000_000_000_000);
        };
        while let Some(b) = stage.recv().await {
            match b.unwrap() {
                Incoming::Raw(messages) => {
                    assert_eq!(decoders, 0, "raw messages from decoder threads");
                    for m in &messages {
                        let d = stage.decode_here(m).unwrap().to_vec();
                        check(m, &d);
                    }
                }
                Incoming::Decoded(b) => {
                    assert_ne!(decoders, 0, "a decoded batch from the loop's own decoding");
                    assert_eq!(b.ends.len(), b.messages.len());
                    assert_eq!(b.ends.last().copied(), Some(b.outputs.len()));
                    let mut start = 0;
                    for (m, &end) in b.messages.iter().zip(&b.ends) {
                        check(m, &b.outputs[start..end]);
                        start = end;
                    }
                    stage.give_back(b);
                }
            }
        }
        feeder.await.unwrap();
        times
    }

    /// A hang (a turn taken out of order waits for ever) is a failure, not a stuck test.
    async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(std::time::Duration::from_secs(60), f)
            .await
            .expect("the stage hung")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn batches_come_back_in_the_order_the_source_gave_them() {
        for decoders in [0, 1, 2, 3] {
            // a last batch that is short, one that is exactly full, and one message
            for n in [5 * BATCH as i64 + 17, 4 * BATCH as i64, 1] {
                let times = within(run(n, decoders)).await;
                assert_eq!(
                    times,
                    (0..n).collect::<Vec<_>>(),
                    "{decoders} decoders, {n}"
                );
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stream_that_ends_before_any_message_ends_the_stage() {
        assert!(within(run(0, 2)).await.is_empty());
        assert!(within(run(0, 0)).await.is_empty());
    }

    /// Firehose frames (one to several events each) with broken ones among them: through 0,
    /// 2 and 3 decoders, every message keeps its own outputs, in order, as one decoder on
    /// this thread gives them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn frames_keep_their_own_events_and_errors_in_order() {
        let mut t = crate::simulate::traffic::Traffic::new(Default::default());
        let mut frames = Vec::new();
        for i in 0..3_000 {
            let mut f = t.next_message().frame;
            if i % 97 == 5 {
                f.truncate(f.len() / 2); // a broken frame: an error, not an event
            }
            frames.push(bytes::Bytes::from(f));
        }
        let mut want = Vec::new();
        let mut d = Decoders::new(true);
        for f in &frames {
            let mut out = Vec::new();
            d.decode_one(
                &RawMessage {
                    payload: Payload::Frame(f.clone()),
                    cursor: None,
                },
                &mut out,
            );
            want.push(out);
        }
        assert!(
            want.iter().any(|o| o.len() > 1),
            "no frame with several events"
        );
        assert!(want.iter().any(|o| matches!(o[..], [Decoded::Error(_)])));
        for decoders in [0, 2, 3] {
            let (tx, rx) = mpsc::channel(64);
            let mut stage = DecodeStage::start(rx, decoders, true).unwrap();
            let frames2 = frames.clone();
            let feeder = tokio::spawn(async move {
                for f in frames2 {
                    let m = RawMessage {
                        payload: Payload::Frame(f),
                        cursor: None,
                    };
                    tx.send(m).await.unwrap();
                }
            });
            let got = within(async {
                let mut got: Vec<Vec<Decoded>> = Vec::new();
                while let Some(b) = stage.recv().await {
                    match b.unwrap() {
                        Incoming::Raw(messages) => {
                            for m in &messages {
                                got.push(stage.decode_here(m).unwrap().to_vec());
                            }
                        }
                        Incoming::Decoded(b) => {
                            let mut start = 0;
                            for &end in &b.ends {
                                got.push(b.outputs[start..end].to_vec());
                                start = end;
                            }
                            stage.give_back(b);
                        }
                    }
                }
                got
            })
            .await;
            feeder.await.unwrap();
            assert_eq!(got.len(), want.len(), "{decoders} decoders");
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(g == w, "{decoders} decoders: frame {i} decoded differently");
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dropped_stage_stops_the_source() {
        let (tx, rx) = mpsc::channel(4);
        let stage = DecodeStage::start(rx, 2, true).unwrap();
        drop(stage);
        // the decoders end, then the dealer, which drops the source's receiver
        within(async {
            let mut i = 0;
            while tx.send(line(i)).await.is_ok() {
                i += 1;
                assert!(i < 100_000, "the source was never stopped");
            }
        })
        .await;
    }

    #[test]
    fn decoder_count_takes_the_configured_number_or_the_cores_for_frames() {
        assert_eq!(decoder_count(3, SourceKind::Jetstream), 3);
        assert_eq!(decoder_count(3, SourceKind::Firehose), 3);
        assert_eq!(decoder_count(0, SourceKind::Jetstream), 0);
        assert_eq!(decoder_count(0, SourceKind::Repo), 0);
        let auto = decoder_count(0, SourceKind::Firehose);
        assert!((1..=4).contains(&auto));
    }
}
