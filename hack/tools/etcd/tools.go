//go:build tools

// Package tools pins etcd, the key-value store behind the local kube-apiserver.
package tools

import _ "go.etcd.io/etcd/server/v3"
