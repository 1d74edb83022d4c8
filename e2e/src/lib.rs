//! Stratum's end-to-end harness. The control plane is real (built and started by
//! `e2e/scripts/`); what a kubelet would do for the agent DaemonSet's pods is done by
//! [`kubelet`]: each pod bound to a fake node becomes a real `stratum-agent` process in that
//! node's network namespace, with the pod's args, env and a pod-bound service-account token.
//! Only the clock backend differs (`simulated`), so nothing touches this machine's clock.

pub mod harness;
pub mod kubelet;
