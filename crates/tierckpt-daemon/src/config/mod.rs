//! Daemon configuration: every setting is declared once, in [`ConfigLayer`],
//! which is at the same time the `tierckptd` flags (`--keep-last`), their
//! environment variables (`TIERCKPT_KEEP_LAST`, shown by `tierckptd
//! --help`), and the keys of the TOML file (`keep_last`). Layers apply in
//! order: the file, then the environment, then flags. Unknown keys in the
//! file are errors that name the key. [`DaemonConfig::resolve`] checks the
//! merged layer and fills in defaults.

mod cgroup;
mod layer;
mod resolve;

pub use layer::{ConfigLayer, LogFormat, NodeList, NodeSpec, StoreOptions};
pub use resolve::{
    open_file_limit, parse_capacity, AdviceConfig, ClusterConfig, DaemonConfig, HealthCheckConfig, NoticeSource,
    PersistConfig, Placement, AUTO_COMPRESSION_CORES, DEFAULT_HYPERPOD_PORT, DEFAULT_MAX_STEP_ADVANCE,
    DEFAULT_MEMORY_DIR, DEFAULT_PERSIST_COMPRESSION, STEP_LIMIT,
};
