package driver

import (
	"context"
	"errors"
	"net/http"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"google.golang.org/grpc/codes"

	"github.com/csi-composefs/csi-composefs/pkg/cfs"
	"github.com/csi-composefs/csi-composefs/pkg/fetch"
)

const metricsNamespace = "csi_composefs"

// Metrics are the driver's Prometheus metrics, on their own registry (no
// global state).
type Metrics struct {
	reg       *prometheus.Registry
	publish   *prometheus.HistogramVec
	unpublish *prometheus.HistogramVec
	fetches   *prometheus.CounterVec
	volumes   prometheus.Gauge
	byVerity  *prometheus.GaugeVec
	gcRuns    *prometheus.CounterVec
	verifyErr prometheus.Counter
	trust     trustMetrics

	once sync.Once
}

// NewMetrics makes the metrics on reg (a new registry when nil).
func NewMetrics(reg *prometheus.Registry) *Metrics {
	if reg == nil {
		reg = prometheus.NewRegistry()
	}
	buckets := []float64{.005, .01, .02, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120}
	m := &Metrics{
		reg: reg,
		publish: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: metricsNamespace, Name: "publish_duration_seconds",
			Help:    "NodePublishVolume latency by result (gRPC code).",
			Buckets: buckets,
		}, []string{"result"}),
		unpublish: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: metricsNamespace, Name: "unpublish_duration_seconds",
			Help:    "NodeUnpublishVolume latency by result (gRPC code).",
			Buckets: buckets,
		}, []string{"result"}),
		fetches: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: metricsNamespace, Name: "fetches_total",
			Help: "Image fetches (image plus missing objects) by result (gRPC code).",
		}, []string{"result"}),
		volumes: prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: metricsNamespace, Name: "volumes_published",
			Help: "Targets with a composefs volume published.",
		}),
		byVerity: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: metricsNamespace, Name: "volumes_published_by_verity",
			Help: "Published volumes by verity mode: require (the kernel checks the image and every page read, overlay verity=require), userspace (digests checked when content entered the store), off.",
		}, []string{"verity"}),
		gcRuns: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: metricsNamespace, Name: "gc_runs_total",
			Help: "Store garbage collections by result.",
		}, []string{"result"}),
		verifyErr: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: metricsNamespace, Name: "verification_failures_total",
			Help: "Content refused because its digest did not match (fetched images and objects, mounted images).",
		}),
	}
	m.trust = newTrustMetrics(reg)
	reg.MustRegister(m.publish, m.unpublish, m.fetches, m.volumes, m.byVerity, m.gcRuns, m.verifyErr,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// Registry returns the registry the metrics are on.
func (m *Metrics) Registry() *prometheus.Registry { return m.reg }

// attach adds the store's counters, read at scrape time.
func (m *Metrics) attach(d *Driver) {
	m.once.Do(func() { m.reg.MustRegister(&storeCollector{d: d}) })
}

func (m *Metrics) observePublish(c codes.Code, dt time.Duration) {
	m.publish.WithLabelValues(c.String()).Observe(dt.Seconds())
}

func (m *Metrics) observeUnpublish(c codes.Code, dt time.Duration) {
	m.unpublish.WithLabelValues(c.String()).Observe(dt.Seconds())
}

func (m *Metrics) observeFetch(_ fetch.Stats, err error) {
	m.fetches.WithLabelValues(errorCode(err).String()).Inc()
	if errors.Is(err, fetch.ErrDigestMismatch) {
		m.verifyErr.Inc()
	}
}

func (m *Metrics) observeGC(_ fetch.GCStats, err error) {
	r := "ok"
	if err != nil {
		r = "error"
	}
	m.gcRuns.WithLabelValues(r).Inc()
}

// setVolumes sets the published-volume gauges from the records.
func (m *Metrics) setVolumes(recs []Record) {
	m.volumes.Set(float64(len(recs)))
	n := map[cfs.VerityMode]int{cfs.VerityRequire: 0, cfs.VerityUserspace: 0, cfs.VerityOff: 0}
	for _, r := range recs {
		mode := r.Verity
		if mode == "" {
			mode = cfs.VerityOff
		}
		n[mode]++
	}
	for mode, k := range n {
		m.byVerity.WithLabelValues(string(mode)).Set(float64(k))
	}
}

func (m *Metrics) verificationFailure() { m.verifyErr.Inc() }

// storeCollector exports the store's cumulative counters and its size.
type storeCollector struct {
	d *Driver

	mu       sync.Mutex
	usageAt  time.Time
	usage    fetch.StoreUsage
	usageErr error
}

var (
	descFetchedBytes = prometheus.NewDesc(metricsNamespace+"_fetched_bytes_total",
		"Bytes downloaded into the store, by kind (image, object).", []string{"kind"}, nil)
	descFetched = prometheus.NewDesc(metricsNamespace+"_fetched_total",
		"Files downloaded into the store, by kind (image, object).", []string{"kind"}, nil)
	descDedupBytes = prometheus.NewDesc(metricsNamespace+"_dedup_saved_bytes_total",
		"Object bytes not downloaded because the node had them (store, extra directories, or a concurrent fetch).", nil, nil)
	descDedupObjects = prometheus.NewDesc(metricsNamespace+"_dedup_saved_objects_total",
		"Objects not downloaded because the node had them.", nil, nil)
	descRetries = prometheus.NewDesc(metricsNamespace+"_fetch_retries_total",
		"Retries of transient fetch failures.", nil, nil)
	descQuarantined = prometheus.NewDesc(metricsNamespace+"_store_quarantined_total",
		"Corrupt files moved out of the store.", nil, nil)
	descGCRemoved = prometheus.NewDesc(metricsNamespace+"_gc_removed_total",
		"Files removed by store GC, by kind (image, object).", []string{"kind"}, nil)
	descGCBytes = prometheus.NewDesc(metricsNamespace+"_gc_freed_bytes_total",
		"Bytes freed by store GC.", nil, nil)
	descStoreBytes = prometheus.NewDesc(metricsNamespace+"_store_bytes",
		"Bytes allocated in the store, by part (objects, images, signatures, tmp, quarantine).", []string{"part"}, nil)
	descProofs = prometheus.NewDesc(metricsNamespace+"_proofs_total",
		"Proofs of possession asked of a volume's source for content already on the node, by result (passed, failed).", []string{"result"}, nil)
	descProofBytes = prometheus.NewDesc(metricsNamespace+"_proof_bytes_total",
		"Bytes received by proofs of possession.", nil, nil)
	descStoreVerity = prometheus.NewDesc(metricsNamespace+"_store_fsverity",
		"1 when the store enables fs-verity on every file it stores (the kernel and filesystem support it; needed by verity=require), else 0.", nil, nil)
	descInFlight = prometheus.NewDesc(metricsNamespace+"_fetches_in_flight",
		"Fetches running (including those kubelet stopped waiting for).", nil, nil)
)

func (c *storeCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descFetchedBytes, descFetched, descDedupBytes, descDedupObjects,
		descRetries, descQuarantined, descGCRemoved, descGCBytes, descStoreBytes, descStoreVerity, descInFlight, descProofs, descProofBytes} {
		ch <- d
	}
}

func (c *storeCollector) Collect(ch chan<- prometheus.Metric) {
	k := c.d.store.Counters()
	counter := func(d *prometheus.Desc, v uint64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), labels...)
	}
	counter(descFetchedBytes, k.ImageBytesFetched, "image")
	counter(descFetchedBytes, k.ObjectBytesFetched, "object")
	counter(descFetched, k.ImagesFetched, "image")
	counter(descFetched, k.ObjectsFetched, "object")
	counter(descDedupBytes, k.BytesDeduplicated)
	counter(descDedupObjects, k.ObjectsDeduplicated)
	counter(descRetries, k.Retries)
	counter(descQuarantined, k.Quarantined)
	counter(descGCRemoved, k.GCImagesRemoved, "image")
	counter(descGCRemoved, k.GCObjectsRemoved, "object")
	counter(descGCBytes, k.GCBytesFreed)
	counter(descProofs, k.Proofs, "passed")
	counter(descProofs, k.ProofsFailed, "failed")
	counter(descProofBytes, k.ProofBytes)
	storeVerity := 0.0
	if c.d.store.VerityEnabled() {
		storeVerity = 1
	}
	ch <- prometheus.MustNewConstMetric(descStoreVerity, prometheus.GaugeValue, storeVerity)
	ch <- prometheus.MustNewConstMetric(descInFlight, prometheus.GaugeValue, float64(c.d.ops.inFlight()))

	// Measuring the store walks it: do it at most every 30s.
	c.mu.Lock()
	if c.usageAt.IsZero() || c.d.now().Sub(c.usageAt) > 30*time.Second {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		c.usage, c.usageErr = fetch.DiskUsage(ctx, c.d.store.Root())
		cancel()
		c.usageAt = c.d.now()
	}
	u, err := c.usage, c.usageErr
	c.mu.Unlock()
	if err == nil {
		for _, p := range []struct {
			name string
			u    fetch.Usage
		}{{"objects", u.Objects}, {"images", u.Images}, {"signatures", u.Signatures}, {"tmp", u.Tmp}, {"quarantine", u.Quarantine}} {
			ch <- prometheus.MustNewConstMetric(descStoreBytes, prometheus.GaugeValue, float64(p.u.Bytes), p.name)
		}
	}
}

// HTTPHandler serves /metrics, /healthz (the plugin answers Probe) and
// /readyz (the store is open and the state recovered).
func (d *Driver) HTTPHandler() http.Handler {
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(d.metrics.reg, promhttp.HandlerOpts{}))
	mux.HandleFunc(HealthzPath, d.healthz)
	mux.HandleFunc(ReadyzPath, d.readyz)
	return mux
}
