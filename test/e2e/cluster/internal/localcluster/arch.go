package localcluster

import "runtime"

func goarch() string { return runtime.GOARCH }
