//! `switchyard-cni`, the CNI plugin container runtimes call to attach a pod.
//!
//! Not implemented yet: it is the subject of the CNI issue (#3), which builds on the
//! dataplane API in the `switchyard-api` crate (`AddPort`, `DelPort`, `ListPorts`).
