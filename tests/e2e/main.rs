//! Integration tests against a real kube-apiserver, etcd and kube-controller-manager
//! started by `hack/control-plane.sh` (once, reused across runs), with the operator
//! running in-process; the `node` tests add a real kubelet with containerd and runc
//! (`hack/node.sh`, needs root). Every test works in its own random namespaces and names.

mod admission;
mod check;
mod confine;
mod ecr;
mod fakes;
mod fanout;
mod faults;
mod federation;
mod ha;
mod node;
mod puller;
mod race;
mod skeleton;
mod support;
mod tenancy;
mod tokens;
mod webhook;
mod workload_checks;
mod workloads;
