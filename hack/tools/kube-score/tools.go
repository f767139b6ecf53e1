//go:build tools

// Package tools pins kube-score, which checks the rendered trainer Job and the chart.
package tools

import _ "github.com/zegl/kube-score/cmd/kube-score"
