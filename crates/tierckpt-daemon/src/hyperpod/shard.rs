//! The `Shard-Meta` header (`{"checksum": base64 of the body's xxh3-128,
//! "algorithm": "xxh3_128"}`) and the shard a HyperPod body is stored as:
//! a safetensors file of one U8 tensor, [`TENSOR`], holding the body, with
//! the header in the metadata under [`META_KEY`].

use std::collections::BTreeMap;

use base64::Engine;
use tierckpt_format::{Dtype, ShardLayout, ShardView, TensorSpec};
use tierckpt_tiers::TierError;

/// Name of the tensor holding the body.
pub(crate) const TENSOR: &str = "hyperpod.data";
/// Metadata key of the `Shard-Meta` header.
pub(crate) const META_KEY: &str = "hyperpod.shard_meta";
/// The only checksum algorithm the client uses.
const ALGORITHM: &str = "xxh3_128";
/// Longest `Shard-Meta` header accepted.
const MAX_META_LEN: usize = 1024;

/// A checked `Shard-Meta` header.
pub(crate) struct ShardMeta {
    /// The body's xxh3-128, big-endian (as Python's `xxhash` digests it).
    pub(crate) checksum: [u8; 16],
}

impl ShardMeta {
    /// Parses the header's value; the error names what is wrong with it.
    pub(crate) fn parse(value: Option<&axum::http::HeaderValue>) -> Result<Self, String> {
        let form = "{\"checksum\": <base64 of the body's xxh3_128>, \"algorithm\": \"xxh3_128\"}";
        let Some(value) = value else {
            return Err(format!("header Shard-Meta is required: {form}"));
        };
        if value.len() > MAX_META_LEN {
            return Err(format!("header Shard-Meta is {} bytes long, more than {MAX_META_LEN}", value.len()));
        }
        let text = value.to_str().map_err(|_| "header Shard-Meta is not visible ASCII text".to_string())?;
        let v: serde_json::Value =
            serde_json::from_str(text).map_err(|e| format!("header Shard-Meta is not JSON ({e}): {form}"))?;
        let Some(obj) = v.as_object() else {
            return Err(format!("header Shard-Meta is not a JSON object: {form}"));
        };
        match obj.get("algorithm") {
            None => {}
            Some(serde_json::Value::String(a)) if a == ALGORITHM => {}
            Some(a) => return Err(format!("Shard-Meta algorithm {a} is not supported: only \"{ALGORITHM}\"")),
        }
        let b64 = match obj.get("checksum") {
            Some(serde_json::Value::String(c)) => c,
            Some(c) => return Err(format!("Shard-Meta checksum {c} is not a string: {form}")),
            None => return Err(format!("Shard-Meta has no checksum: {form}")),
        };
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|e| format!("Shard-Meta checksum {b64:?} is not base64 ({e})"))?;
        let checksum: [u8; 16] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| format!("Shard-Meta checksum {b64:?} decodes to {} bytes; an xxh3_128 has 16", bytes.len()))?;
        Ok(Self { checksum })
    }

    /// The header as this daemon writes it back.
    pub(crate) fn to_json(&self) -> String {
        serde_json::json!({ "checksum": b64(&self.checksum), "algorithm": ALGORITHM }).to_string()
    }
}

/// Standard base64 with padding, as the client encodes.
pub(crate) fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The layout of the shard holding a body of `len` bytes.
pub(crate) fn layout(meta: &ShardMeta, len: u64) -> Result<ShardLayout, TierError> {
    let len = usize::try_from(len).map_err(|_| TierError::InvalidArgument(format!("a body of {len} bytes")))?;
    let spec = TensorSpec { name: TENSOR.into(), dtype: Dtype::U8, shape: vec![len] };
    let metadata = BTreeMap::from([(META_KEY.to_string(), meta.to_json())]);
    Ok(ShardLayout::new(&[spec], &metadata)?)
}

/// Where the body lies in a stored shard, and its `Shard-Meta`; `None` for a
/// shard not written through this API (no such tensor or metadata).
pub(crate) fn body_of(view: &ShardView) -> Option<(std::ops::Range<usize>, String)> {
    let meta = view.metadata.get(META_KEY)?;
    let e = view.entry(TENSOR).filter(|e| e.dtype == Dtype::U8 && view.entries.len() == 1)?;
    Some((e.range(), meta.clone()))
}
