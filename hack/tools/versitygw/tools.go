//go:build tools

// Package tools pins versitygw, the Apache-2.0 S3-compatible server used for checkpoints in tests.
package tools

import _ "github.com/versity/versitygw/cmd/versitygw"
