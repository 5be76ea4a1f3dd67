"""Kubernetes manifests for opskit and the generator of the ones made from alerts/ and dashboards/."""
