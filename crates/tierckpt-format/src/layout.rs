//! Byte layout of a shard (a safetensors file) and its parser.
//!
//! Layout: 8-byte little-endian header length, the JSON header padded with
//! spaces so tensor data starts on a 64-byte boundary, then the tensor bytes
//! back to back. Tensors are placed in order of decreasing element size, which
//! keeps every tensor aligned to its element size.

use std::collections::{BTreeMap, HashMap, HashSet};

use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::Dtype;

use crate::names::validate_tensor_name;
use crate::{byte_len, FormatError};

/// Tensor data starts at a multiple of this many bytes.
const DATA_ALIGN: usize = 64;
/// The largest JSON header written or read.
const MAX_HEADER_LEN: usize = 100_000_000;

/// A tensor to be written: name, dtype and shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    /// The tensor's name (see [`crate::names`]).
    pub name: String,
    /// Its element type.
    pub dtype: Dtype,
    /// Its dimensions.
    pub shape: Vec<usize>,
}

/// Where one tensor's bytes live inside the shard file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorEntry {
    /// The tensor's name.
    pub name: String,
    /// Its element type.
    pub dtype: Dtype,
    /// Its dimensions.
    pub shape: Vec<usize>,
    /// Absolute byte offset in the file.
    pub offset: u64,
    /// Length of its bytes.
    pub len: u64,
}

impl TensorEntry {
    /// The tensor's bytes in the file, as a range to index it with.
    pub fn range(&self) -> std::ops::Range<usize> {
        self.offset as usize..(self.offset + self.len) as usize
    }
}

/// The planned layout of a shard before any tensor byte is written.
#[derive(Debug, Clone)]
pub struct ShardLayout {
    /// Length prefix, JSON header and padding: the first bytes of the file.
    pub header: Vec<u8>,
    /// In the order given to [`ShardLayout::new`].
    pub entries: Vec<TensorEntry>,
    /// Length of the whole file.
    pub file_len: u64,
}

impl ShardLayout {
    /// Plans the file holding `tensors` and `metadata` (the safetensors
    /// `__metadata__`); an error for an invalid or repeated tensor name, a
    /// shape whose bytes overflow or are not whole, or a header too large.
    pub fn new(tensors: &[TensorSpec], metadata: &BTreeMap<String, String>) -> Result<Self, FormatError> {
        let mut seen = HashSet::new();
        let mut lens = Vec::with_capacity(tensors.len());
        for t in tensors {
            validate_tensor_name(&t.name)?;
            if !seen.insert(t.name.as_str()) {
                return Err(FormatError::InvalidArgument(format!("tensor name {:?} appears twice", t.name)));
            }
            lens.push(byte_len(t.dtype, &t.shape)?);
        }
        let mut order: Vec<usize> = (0..tensors.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(tensors[i].dtype.bitsize()));
        let mut rel = vec![0usize; tensors.len()];
        let mut infos = Vec::with_capacity(tensors.len());
        let mut pos = 0usize;
        for &i in &order {
            rel[i] = pos;
            let t = &tensors[i];
            infos.push((
                t.name.clone(),
                TensorInfo { dtype: t.dtype, shape: t.shape.clone(), data_offsets: (pos, pos + lens[i]) },
            ));
            pos += lens[i];
        }
        let meta = (!metadata.is_empty())
            .then(|| metadata.iter().map(|(k, v)| (k.clone(), v.clone())).collect::<HashMap<_, _>>());
        let md = Metadata::new(meta, infos).map_err(|e| FormatError::InvalidArgument(format!("tensor layout: {e}")))?;
        let mut json = serde_json::to_vec(&md).expect("safetensors metadata serializes");
        let padded = (8 + json.len()).next_multiple_of(DATA_ALIGN) - 8;
        json.resize(padded, b' ');
        if json.len() > MAX_HEADER_LEN {
            return Err(FormatError::InvalidArgument(format!(
                "safetensors header of {} bytes exceeds the {MAX_HEADER_LEN}-byte limit; use fewer tensors or less metadata",
                json.len()
            )));
        }
        let data_start = 8 + json.len();
        let mut header = Vec::with_capacity(data_start);
        header.extend_from_slice(&(json.len() as u64).to_le_bytes());
        header.extend_from_slice(&json);
        let entries = tensors
            .iter()
            .enumerate()
            .map(|(i, t)| TensorEntry {
                name: t.name.clone(),
                dtype: t.dtype,
                shape: t.shape.clone(),
                offset: (data_start + rel[i]) as u64,
                len: lens[i] as u64,
            })
            .collect();
        Ok(Self { header, entries, file_len: (data_start + pos) as u64 })
    }
}

/// A parsed shard: its tensors (in file order) and metadata.
#[derive(Debug, Clone)]
pub struct ShardView {
    /// The tensors, by offset.
    pub entries: Vec<TensorEntry>,
    /// The safetensors `__metadata__` map (empty if none).
    pub metadata: BTreeMap<String, String>,
    /// Offset of the first tensor byte (length prefix and header before it).
    pub data_start: u64,
}

impl ShardView {
    /// The tensor named `name`, if any.
    pub fn entry(&self, name: &str) -> Option<&TensorEntry> {
        self.entries.iter().find(|e| e.name == name)
    }
}

/// Parses the safetensors header of a whole shard file. `file` names it in errors.
pub fn parse_shard(bytes: &[u8], file: &str) -> Result<ShardView, FormatError> {
    let invalid = |reason: String| FormatError::InvalidHeader { file: file.to_string(), reason };
    let truncated =
        |expected: u64| FormatError::Truncated { file: file.to_string(), expected, found: bytes.len() as u64 };
    let prefix: [u8; 8] = bytes.get(..8).ok_or_else(|| truncated(8))?.try_into().expect("8 bytes");
    let n = u64::from_le_bytes(prefix);
    if n > MAX_HEADER_LEN as u64 {
        return Err(invalid(format!("header length {n} exceeds the {MAX_HEADER_LEN}-byte limit")));
    }
    let data_start = 8 + n as usize;
    let json = bytes.get(8..data_start).ok_or_else(|| truncated(data_start as u64))?;
    let md: Metadata = serde_json::from_slice(json).map_err(|e| invalid(e.to_string()))?;
    let expected = (data_start + md.data_len()) as u64;
    if (bytes.len() as u64) < expected {
        return Err(truncated(expected));
    }
    if (bytes.len() as u64) > expected {
        return Err(invalid(format!("{} bytes follow the last tensor", bytes.len() as u64 - expected)));
    }
    let infos = md.tensors();
    let mut entries: Vec<TensorEntry> = infos
        .into_iter()
        .map(|(name, info)| TensorEntry {
            name,
            dtype: info.dtype,
            shape: info.shape.clone(),
            offset: (data_start + info.data_offsets.0) as u64,
            len: (info.data_offsets.1 - info.data_offsets.0) as u64,
        })
        .collect();
    // The writers' name rules hold for every shard, however it arrived.
    for e in &entries {
        validate_tensor_name(&e.name).map_err(|e| invalid(e.to_string()))?;
    }
    entries.sort_by(|a, b| a.offset.cmp(&b.offset).then_with(|| a.name.cmp(&b.name)));
    let metadata =
        md.metadata().as_ref().map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()).unwrap_or_default();
    Ok(ShardView { entries, metadata, data_start: data_start as u64 })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn build(specs: &[TensorSpec], meta: &BTreeMap<String, String>) -> (ShardLayout, Vec<u8>) {
        let l = ShardLayout::new(specs, meta).unwrap();
        let mut file = vec![0u8; l.file_len as usize];
        file[..l.header.len()].copy_from_slice(&l.header);
        for (i, e) in l.entries.iter().enumerate() {
            for (j, b) in file[e.range()].iter_mut().enumerate() {
                *b = (i * 7 + j) as u8;
            }
        }
        (l, file)
    }

    fn spec(name: &str, dtype: Dtype, shape: &[usize]) -> TensorSpec {
        TensorSpec { name: name.into(), dtype, shape: shape.to_vec() }
    }

    #[test]
    fn layout_is_valid_safetensors_and_aligned() {
        let specs = vec![
            spec("b", Dtype::U8, &[3]),
            spec("a", Dtype::F64, &[2, 3]),
            spec("empty", Dtype::F32, &[0, 4]),
            spec("scalar", Dtype::BF16, &[]),
            spec("f4", Dtype::F4, &[6]),
        ];
        let meta = BTreeMap::from([("step".to_string(), "7".to_string())]);
        let (l, file) = build(&specs, &meta);
        for e in &l.entries {
            assert_eq!(e.offset as usize % (e.dtype.bitsize() / 8).max(1), 0, "{e:?}");
        }
        let st = safetensors::SafeTensors::deserialize(&file).unwrap();
        assert_eq!(st.len(), 5);
        assert_eq!(st.tensor("a").unwrap().data(), &file[l.entries[1].range()]);
        let v = parse_shard(&file, "f").unwrap();
        assert_eq!(v.metadata, meta);
        assert_eq!(v.entry("b").unwrap(), &l.entries[0]);
        assert_eq!(v.data_start % 64, 0);
    }

    #[test]
    fn bad_specs_are_named() {
        let dup = [spec("x", Dtype::U8, &[1]), spec("x", Dtype::U8, &[1])];
        let e = ShardLayout::new(&dup, &BTreeMap::new()).unwrap_err().to_string();
        assert!(e.contains("\"x\" appears twice"), "{e}");
        let odd = [spec("x", Dtype::F4, &[3])];
        assert!(ShardLayout::new(&odd, &BTreeMap::new()).is_err());
        let huge = [spec("x", Dtype::F64, &[usize::MAX, 2])];
        assert!(ShardLayout::new(&huge, &BTreeMap::new()).is_err());
    }

    #[test]
    fn truncated_and_trailing_bytes_are_errors() {
        let (_, file) = build(&[spec("a", Dtype::F32, &[10])], &BTreeMap::new());
        let e = parse_shard(&file[..file.len() - 1], "shard.safetensors").unwrap_err();
        assert!(matches!(e, FormatError::Truncated { .. }), "{e}");
        assert!(e.to_string().contains("shard.safetensors"));
        let mut longer = file.clone();
        longer.push(0);
        assert!(matches!(parse_shard(&longer, "f"), Err(FormatError::InvalidHeader { .. })));
        assert!(matches!(parse_shard(&file[..4], "f"), Err(FormatError::Truncated { .. })));
    }

    /// A header naming `name`, written as raw JSON (no writer-side check).
    fn raw_shard(name: &str) -> Vec<u8> {
        let json = serde_json::json!({ name: {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]} }).to_string();
        let mut file = (json.len() as u64).to_le_bytes().to_vec();
        file.extend_from_slice(json.as_bytes());
        file.extend_from_slice(&[1, 2, 3, 4]);
        file
    }

    #[test]
    fn tensor_names_with_control_characters_are_refused_and_shown_escaped() {
        parse_shard(&raw_shard("w.0"), "ok").unwrap();
        for bad in ["\u{1b}[31mred", "a\nb", "\u{9b}c", "__metadata__x\u{7f}"] {
            let e = parse_shard(&raw_shard(bad), "shard.safetensors").unwrap_err();
            assert!(matches!(e, FormatError::InvalidHeader { .. }), "{e}");
            let msg = e.to_string();
            assert!(msg.contains("shard.safetensors") && msg.contains("tensor name"), "{msg}");
            assert!(!msg.chars().any(char::is_control), "the message is escaped: {msg:?}");
        }
        let e = parse_shard(&raw_shard("\u{1b}[31m"), "f").unwrap_err().to_string();
        assert!(e.contains(r#""\u{1b}[31m""#), "{e}");
        // The writer refuses the same names with the same rule.
        let spec = [spec("\u{1b}[31m", Dtype::U8, &[4])];
        assert!(ShardLayout::new(&spec, &BTreeMap::new()).unwrap_err().to_string().contains("tensor name"));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn parser_never_panics_on_random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse_shard(&bytes, "fuzz");
        }

        #[test]
        fn parser_never_panics_on_mutated_headers(
            pos in 0usize..400, val in any::<u8>(), cut in 0usize..600,
        ) {
            let (_, mut file) = build(
                &[spec("w", Dtype::F32, &[4, 4]), spec("b", Dtype::I64, &[3])],
                &BTreeMap::from([("k".into(), "v".into())]),
            );
            let p = pos % file.len();
            file[p] = val;
            file.truncate(cut.min(file.len()));
            let _ = parse_shard(&file, "fuzz");
        }

        #[test]
        fn arbitrary_layouts_round_trip(
            shapes in proptest::collection::vec(proptest::collection::vec(0usize..5, 0..3), 0..6),
            dt in proptest::collection::vec(0usize..6, 6),
        ) {
            let dtypes = [Dtype::U8, Dtype::F16, Dtype::BF16, Dtype::F32, Dtype::I64, Dtype::BOOL];
            let specs: Vec<_> = shapes.iter().enumerate()
                .map(|(i, s)| spec(&format!("t{i}"), dtypes[dt[i]], s)).collect();
            let (l, file) = build(&specs, &BTreeMap::new());
            let v = parse_shard(&file, "f").unwrap();
            for e in &l.entries {
                prop_assert_eq!(v.entry(&e.name).unwrap(), e);
            }
            safetensors::SafeTensors::deserialize(&file).unwrap();
        }
    }
}
