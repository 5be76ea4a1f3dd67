"""Kubernetes manifests for opskit (generated/ is written by `opskit generate manifests`); shipped with opskit."""
