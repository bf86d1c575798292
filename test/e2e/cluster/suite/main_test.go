// Package suite is the end-to-end suite of csi-composefs on a real
// cluster: client-go against the cluster named by KUBECONFIG (the local
// cluster by default), a static HTTP repository served by the test on an
// address the node reaches, and images built by the project's CLI during
// the run. The driver must already be installed with the Helm chart.
//
// Each case prints what it measured; the run ends with "N passed, N failed".
//
// Environment (defaults fit the local cluster of `make e2e`):
//
//	E2E=1              run the suite (otherwise it prints why not and passes)
//	KUBECONFIG         cluster to test ($E2E_WORK/pki/admin.kubeconfig)
//	E2E_CLI            the csi-composefs binary (built from the repository when unset)
//	E2E_REPO_ADDR      address the repository listens on (127.0.0.1:18080)
//	E2E_REPO_URL       its base URL as the node sees it (http://$E2E_REPO_ADDR)
//	E2E_REPO_PREFIX    path under the URL the chart's allow-list admits (/e2e/)
//	E2E_RELEASE        Helm release of the driver (csi-composefs)
//	E2E_NAMESPACE      its namespace (csi-composefs)
//	E2E_CHART          the chart folder, for upgrade cases (charts/csi-composefs)
//	E2E_BUSYBOX        image the test pods run (e2e.local/busybox:1)
package suite

import (
	"fmt"
	"os"
	"sync"
	"testing"
)

var (
	resultsMu sync.Mutex
	passed    int
	failed    int
	skipped   int
)

func TestMain(m *testing.M) {
	if os.Getenv("E2E") == "" {
		// `go test ./...` in this module runs the unit tests only.
		fmt.Println("e2e suite not run: it needs a cluster with the driver installed (make e2e, or E2E=1 with KUBECONFIG)")
		os.Exit(0)
	}
	code := m.Run()
	if envVal != nil {
		envVal.stopProbe()
	}
	resultsMu.Lock()
	line := fmt.Sprintf("%d passed, %d failed", passed, failed)
	if skipped > 0 {
		line += fmt.Sprintf(", %d skipped", skipped)
	}
	resultsMu.Unlock()
	fmt.Println(line)
	os.Exit(code)
}

// runCase counts a case into the closing line once it is over.
func runCase(t *testing.T) {
	t.Cleanup(func() {
		resultsMu.Lock()
		defer resultsMu.Unlock()
		switch {
		case t.Failed():
			failed++
		case t.Skipped():
			skipped++
		default:
			passed++
		}
	})
}

// report prints one measured figure of a case, always (also without -v).
func report(t *testing.T, format string, args ...any) {
	t.Helper()
	msg := fmt.Sprintf(format, args...)
	fmt.Printf("    %s: %s\n", t.Name(), msg)
}
