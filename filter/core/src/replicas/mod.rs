//! Stage 6, several gateway replicas: tokens and revocations shared through etcd ([`etcd`]:
//! the calls and their answers, leases, revocation sweeps, the poller's lease).
pub mod etcd;
