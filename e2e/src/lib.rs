//! Stratum's end-to-end harness. The control plane is real (built and started by
//! `e2e/scripts/`); what a kubelet would do for the agent DaemonSet's pods is done by
//! [`kubelet`]: each pod bound to a fake node becomes a real `stratum-agent` process in that
//! node's network namespace, with the pod's args, env and a pod-bound service-account token.
//! Only the clock backend differs (`simulated`), so nothing touches this machine's clock.
//! [`real_node`] drives the stack's one real node (kubelet, containerd, kube-proxy, CoreDNS),
//! where tenant workloads are real pods reaching their Service by name.

pub mod harness;
pub mod kubelet;
pub mod real_node;
