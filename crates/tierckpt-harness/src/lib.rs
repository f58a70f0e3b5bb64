//! Real `tierckptd` processes on one machine, for tests, the demo and the
//! benchmarks: a daemon child on a tmpfs directory and a 127.0.0.1 port
//! ([`daemon`]), a cluster of them ([`daemon::LocalCluster`]), a client
//! process that pauses at any phase of a save so that tests can SIGKILL it
//! there ([`writer`]), several hosts in network namespaces around a bridge,
//! with capped links and a DNS server ([`hosts`]), a real S3-protocol server ([`moto`]), the small
//! helpers every test shares ([`testing`]), and the one random generator,
//! median and size parser of the tests, the demo and the benchmarks ([`rng`],
//! [`stats`], [`size`]).
//!
//! Not published: nothing here is part of tierckpt's interface.

pub mod daemon;
pub mod hosts;
pub mod moto;
pub mod rng;
pub mod size;
pub mod stats;
pub mod testing;
pub mod writer;
