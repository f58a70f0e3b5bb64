//! The report of `bench reduce`: its rows, as JSON and as tables.

use serde::Serialize;
use tierckpt_format::ReduceStats;

use crate::output;

/// One workload under one compression. Ratios of bytes are encoded over raw
/// (the whole blob, header included); time ratios are a time over the memcpy
/// floor of the same bytes; throughputs are GiB/s of raw bytes. Figures are
/// medians over the checkpoints after the first.
#[derive(Debug, Clone, Serialize)]
pub struct ReduceRow {
    /// The workload.
    pub workload: &'static str,
    /// The compression.
    pub compression: String,
    /// Bytes of each checkpoint's shard file.
    pub file_bytes: u64,
    /// Checkpoints encoded against the one before.
    pub steps_measured: usize,
    /// Encoded alone, over raw.
    pub compress_bytes_ratio: f64,
    /// Encoded against the checkpoint before, over raw.
    pub delta_bytes_ratio: f64,
    /// Encoding alone: rate.
    pub compress_encode_gibps: f64,
    /// Encoding alone: time over the floor.
    pub compress_encode_ratio: f64,
    /// Decoding that: rate.
    pub compress_decode_gibps: f64,
    /// Decoding that: time over the floor.
    pub compress_decode_ratio: f64,
    /// Encoding a delta: rate.
    pub delta_encode_gibps: f64,
    /// Encoding a delta: time over the floor.
    pub delta_encode_ratio: f64,
    /// Decoding a delta: rate.
    pub delta_decode_gibps: f64,
    /// Decoding a delta: time over the floor.
    pub delta_decode_ratio: f64,
    /// The floor's rate (one-thread memcpy).
    pub memcpy_floor_gibps: f64,
    /// Chunk kinds of the last delta encode.
    pub delta_stats: ReduceStats,
    /// Chunk kinds of the last encode without a base.
    pub compress_stats: ReduceStats,
    /// The target for this workload (delta bytes ratio), if any.
    pub target_ratio: Option<f64>,
    /// Whether `delta_bytes_ratio` is within the target.
    pub meets_target: Option<bool>,
}

/// What `bench reduce` measured.
#[derive(Debug, Clone, Serialize)]
pub struct ReduceReport {
    /// Which benchmark this is.
    pub benchmark: &'static str,
    /// Bytes of each checkpoint.
    pub size: u64,
    /// Checkpoints per workload.
    pub steps: usize,
    /// Threads of encode and decode (all cores, at most 8).
    pub codec_threads: usize,
    /// Threads of the floor (one).
    pub floor_threads: usize,
    /// One row per workload and compression (the codec).
    pub rows: Vec<ReduceRow>,
    /// Every decoded checkpoint was compared with the original.
    pub decoded_identical: bool,
    /// Daemon flags of the two paths end to end (empty when skipped).
    pub end_to_end_uncompressed_flags: String,
    /// Daemon flags of the reduced path.
    pub end_to_end_reduced_flags: String,
    /// One row per workload; empty with `--no-end-to-end`.
    pub end_to_end: Vec<EndToEndRow>,
    /// The "no loss of throughput where nothing shrinks", on `random`.
    pub no_loss_check: Option<NoLossCheck>,
}

/// One path end to end on one workload. Times are the best of the
/// checkpoints after the first, from the save's return on node 0; bytes are
/// the daemons' counters over the same checkpoints.
#[derive(Debug, Clone, Serialize)]
pub struct EndToEndPath {
    /// Until node 1 holds the shard.
    pub replicate_s: f64,
    /// Its rate.
    pub replicate_gibps: f64,
    /// Until node 0's drain reports the step committed.
    pub persist_s: f64,
    /// Its rate.
    pub persist_gibps: f64,
    /// Shard bytes replicated (before delta and compression) and what went
    /// over the wire; ratio wire / sent.
    pub bytes_sent: u64,
    /// What went over the wire for them.
    pub wire_bytes_sent: u64,
    /// `wire_bytes_sent / bytes_sent`.
    pub replication_bytes_ratio: f64,
    /// Replicas sent as deltas.
    pub delta_shards_sent: u64,
    /// Replicas the daemon sent compressed (where it measured that it pays).
    pub encoded_shards_sent: u64,
    /// Replicas sent.
    pub shards_sent: u64,
    /// Shard bytes uploaded (before delta and compression) and what the store
    /// holds for them; ratio stored / uploaded.
    pub uploaded_bytes: u64,
    /// What the store holds for them.
    pub stored_bytes: u64,
    /// `stored_bytes / uploaded_bytes`.
    pub persistence_bytes_ratio: f64,
    /// Shards stored as deltas.
    pub delta_shards: u64,
}

/// One workload end to end, on both paths.
#[derive(Debug, Clone, Serialize)]
pub struct EndToEndRow {
    /// The workload.
    pub workload: &'static str,
    /// Bytes of each checkpoint's shard file.
    pub file_bytes: u64,
    /// Checkpoints measured (after the first).
    pub steps_measured: usize,
    /// Compression of the reduced path's persistent tier.
    pub persist_compression: String,
    /// Compression of the reduced path's replicas.
    pub replication_compression: String,
    /// The uncompressed path.
    pub uncompressed: EndToEndPath,
    /// The reduced path.
    pub reduced: EndToEndPath,
    /// Uncompressed time over reduced time: above 1, the reduced path is faster.
    pub replicate_throughput_ratio: f64,
    /// The same for persistence.
    pub persist_throughput_ratio: f64,
    /// The target for this workload, for bytes sent and stored alike.
    pub target_ratio: Option<f64>,
    /// Whether both byte ratios are within the target.
    pub meets_target: Option<bool>,
}

/// The check that nothing is lost where nothing shrinks.
#[derive(Debug, Clone, Serialize)]
pub struct NoLossCheck {
    /// The workload checked (random).
    pub workload: &'static str,
    /// Reduced over uncompressed replication throughput.
    pub replicate_throughput_ratio: f64,
    /// The same for persistence.
    pub persist_throughput_ratio: f64,
    /// The least each may be.
    pub target_ratio: f64,
    /// Whether both reach it.
    pub met: bool,
}

/// Prints the report as tables.
pub fn print(r: &ReduceReport) {
    println!(
        "bench reduce: {} per checkpoint, {} checkpoints per workload; medians over the {} deltas; codec on {} threads, floor a {}-thread memcpy",
        output::human_bytes(r.size),
        r.steps,
        r.steps - 1,
        r.codec_threads,
        r.floor_threads
    );
    let mut t = output::table(&[
        "workload",
        "compression",
        "bytes: compressed",
        "bytes: delta",
        "encode GiB/s (x floor)",
        "decode GiB/s (x floor)",
        "delta encode GiB/s (x floor)",
        "delta decode GiB/s (x floor)",
        "floor GiB/s",
        "delta chunks same/xor/comp/raw",
    ]);
    for x in &r.rows {
        let s = &x.delta_stats;
        t.add_row(vec![
            x.workload.to_string(),
            x.compression.clone(),
            format!("{:.3}", x.compress_bytes_ratio),
            format!("{:.3}", x.delta_bytes_ratio),
            format!("{:.2} ({:.1})", x.compress_encode_gibps, x.compress_encode_ratio),
            format!("{:.2} ({:.1})", x.compress_decode_gibps, x.compress_decode_ratio),
            format!("{:.2} ({:.1})", x.delta_encode_gibps, x.delta_encode_ratio),
            format!("{:.2} ({:.1})", x.delta_decode_gibps, x.delta_decode_ratio),
            format!("{:.2}", x.memcpy_floor_gibps),
            format!("{}/{}/{}/{}", s.same_chunks, s.xor_chunks, s.compressed_chunks, s.raw_chunks),
        ]);
    }
    println!("{t}");
    println!(
        "bytes are encoded/raw, the blob's header included; (x floor) is the time over a memcpy of the same bytes"
    );
    for x in &r.rows {
        if let (Some(target), Some(ok)) = (x.target_ratio, x.meets_target) {
            println!(
                "target: {} with {}: delta at most {target} of the full size -- {:.3} ({})",
                x.workload,
                x.compression,
                x.delta_bytes_ratio,
                if ok { "met" } else { "missed" }
            );
        }
    }
    if r.end_to_end.is_empty() {
        return;
    }
    println!();
    println!(
        "end to end: 2 nodes, k=1, ring, file:// persistent tier; times are the best of the {} checkpoints after the first",
        r.steps - 1
    );
    println!("  uncompressed path: {}", r.end_to_end_uncompressed_flags);
    println!("  reduced path:      {}", r.end_to_end_reduced_flags);
    let mut t = output::table(&[
        "workload",
        "path",
        "replicate s (GiB/s)",
        "wire/sent bytes",
        "shards sent: delta/compressed/all",
        "persist s (GiB/s)",
        "stored/uploaded bytes",
        "delta shards stored",
    ]);
    for x in &r.end_to_end {
        for (name, p) in [("uncompressed", &x.uncompressed), ("reduced", &x.reduced)] {
            t.add_row(vec![
                x.workload.to_string(),
                name.to_string(),
                format!("{:.4} ({:.2})", p.replicate_s, p.replicate_gibps),
                format!("{:.3}", p.replication_bytes_ratio),
                format!("{}/{}/{}", p.delta_shards_sent, p.encoded_shards_sent, p.shards_sent),
                format!("{:.4} ({:.2})", p.persist_s, p.persist_gibps),
                format!("{:.3}", p.persistence_bytes_ratio),
                p.delta_shards.to_string(),
            ]);
        }
    }
    println!("{t}");
    let mut t = output::table(&[
        "workload",
        "replicate throughput, reduced/uncompressed",
        "persist throughput, reduced/uncompressed",
    ]);
    for x in &r.end_to_end {
        t.add_row(vec![
            x.workload.to_string(),
            format!("{:.2}", x.replicate_throughput_ratio),
            format!("{:.2}", x.persist_throughput_ratio),
        ]);
    }
    println!("{t}");
    println!("throughput ratios are the uncompressed path's time over the reduced path's: above 1, the reduced path is faster");
    for x in &r.end_to_end {
        if let (Some(target), Some(ok)) = (x.target_ratio, x.meets_target) {
            println!(
                "target: {} end to end: sent and stored at most {target} of the full size -- sent {:.3}, stored {:.3} ({})",
                x.workload,
                x.reduced.replication_bytes_ratio,
                x.reduced.persistence_bytes_ratio,
                if ok { "met" } else { "missed" }
            );
            let p = &x.reduced;
            if p.replication_bytes_ratio > target && p.encoded_shards_sent < p.shards_sent {
                println!(
                    "  replicas went compressed {} times of {}: the daemon measured that on this link ({:.2} GiB/s uncompressed) compressing is slower than sending; --replication-bandwidth emulates a slower one",
                    p.encoded_shards_sent, p.shards_sent, x.uncompressed.replicate_gibps
                );
            }
        }
    }
    if let Some(c) = &r.no_loss_check {
        println!(
            "target: no loss of throughput where nothing shrinks ({}): reduced at least {} of uncompressed -- replicate {:.2}, persist {:.2} ({})",
            c.workload,
            c.target_ratio,
            c.replicate_throughput_ratio,
            c.persist_throughput_ratio,
            if c.met { "met" } else { "missed" }
        );
    }
}
