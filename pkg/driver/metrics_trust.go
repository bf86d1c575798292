package driver

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/csi-composefs/csi-composefs/pkg/trust"
)

// trustMetrics count signature checks and trust policy reloads.
type trustMetrics struct {
	checks  *prometheus.CounterVec
	reloads *prometheus.CounterVec
}

func newTrustMetrics(reg *prometheus.Registry) trustMetrics {
	t := trustMetrics{
		checks: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: metricsNamespace, Name: "signature_checks_total",
			Help: "Image signature checks the trust policy asked for, by result: verified, unsigned (refused: a signature is required), rejected (refused: no published signature verifies).",
		}, []string{"result"}),
		reloads: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: metricsNamespace, Name: "trust_policy_reloads_total",
			Help: "Changes of the trust policy file seen, by result: ok (now in force) or error (the last good policy stays).",
		}, []string{"result"}),
	}
	reg.MustRegister(t.checks, t.reloads)
	return t
}

// signatureCheck counts a check's result.
func (m *Metrics) signatureCheck(result string) { m.trust.checks.WithLabelValues(result).Inc() }

// PolicyReloaded counts a change of the trust policy file (the OnReload
// of a trust.Watcher).
func (m *Metrics) PolicyReloaded(_ *trust.Policy, err error) {
	result := "ok"
	if err != nil {
		result = "error"
	}
	m.trust.reloads.WithLabelValues(result).Inc()
}
