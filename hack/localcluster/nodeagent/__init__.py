"""The process node agent (the local cluster's stand-in for the kubelet)."""
