//go:build tools

// Package tools pins the Helm CLI used to install the chart.
package tools

import _ "helm.sh/helm/v3/cmd/helm"
