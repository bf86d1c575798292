// Package helmops installs, upgrades and uninstalls the driver's chart with
// the Helm SDK, as `helm install/upgrade/uninstall --wait` would.
package helmops

import (
	"context"
	"fmt"
	"io"
	"time"

	"helm.sh/helm/v3/pkg/action"
	"helm.sh/helm/v3/pkg/chart"
	"helm.sh/helm/v3/pkg/chart/loader"
	"helm.sh/helm/v3/pkg/cli"
	"helm.sh/helm/v3/pkg/storage/driver"
	"helm.sh/helm/v3/pkg/strvals"
)

// Release names one release of the chart in a cluster.
type Release struct {
	Kubeconfig string
	Namespace  string
	Name       string
	Log        io.Writer     // Helm's debug lines (nil: dropped)
	Timeout    time.Duration // for --wait (default 5m)
}

func (r Release) config() (*action.Configuration, error) {
	s := cli.New()
	s.KubeConfig = r.Kubeconfig
	s.SetNamespace(r.Namespace)
	cfg := new(action.Configuration)
	logf := func(format string, v ...any) {
		if r.Log != nil {
			fmt.Fprintf(r.Log, "helm: "+format+"\n", v...)
		}
	}
	if err := cfg.Init(s.RESTClientGetter(), r.Namespace, "secret", logf); err != nil {
		return nil, fmt.Errorf("helm configuration: %w", err)
	}
	return cfg, nil
}

func (r Release) timeout() time.Duration {
	if r.Timeout > 0 {
		return r.Timeout
	}
	return 5 * time.Minute
}

// ParseSet merges --set style assignments ("a.b=c,d=e") into vals.
func ParseSet(vals map[string]any, sets ...string) error {
	for _, s := range sets {
		if err := strvals.ParseInto(s, vals); err != nil {
			return fmt.Errorf("--set %s: %w", s, err)
		}
	}
	return nil
}

// ParseSetString merges --set-string style assignments into vals: every
// value a string (an image tag of digits only is still a tag).
func ParseSetString(vals map[string]any, sets ...string) error {
	for _, s := range sets {
		if err := strvals.ParseIntoString(s, vals); err != nil {
			return fmt.Errorf("--set-string %s: %w", s, err)
		}
	}
	return nil
}

// Install installs the chart folder with vals, or upgrades the release
// to it when it exists (values replaced, not reused), and waits until its
// resources are ready.
func (r Release) Install(ctx context.Context, chartDir string, vals map[string]any) error {
	cfg, err := r.config()
	if err != nil {
		return err
	}
	ch, err := loader.Load(chartDir)
	if err != nil {
		return fmt.Errorf("loading chart %s: %w", chartDir, err)
	}
	if _, err := action.NewHistory(cfg).Run(r.Name); err == driver.ErrReleaseNotFound {
		in := action.NewInstall(cfg)
		in.ReleaseName, in.Namespace, in.CreateNamespace = r.Name, r.Namespace, true
		in.Wait, in.Timeout = true, r.timeout()
		if _, err := in.RunWithContext(ctx, ch, vals); err != nil {
			return fmt.Errorf("helm install %s: %w", r.Name, err)
		}
		return nil
	}
	return r.upgrade(ctx, cfg, ch, vals, false)
}

// Upgrade upgrades the release to the chart folder, with the release's
// values and vals over them (helm upgrade --reuse-values --set ...).
func (r Release) Upgrade(ctx context.Context, chartDir string, vals map[string]any) error {
	cfg, err := r.config()
	if err != nil {
		return err
	}
	ch, err := loader.Load(chartDir)
	if err != nil {
		return fmt.Errorf("loading chart %s: %w", chartDir, err)
	}
	return r.upgrade(ctx, cfg, ch, vals, true)
}

func (r Release) upgrade(ctx context.Context, cfg *action.Configuration, c *chart.Chart, vals map[string]any, reuse bool) error {
	up := action.NewUpgrade(cfg)
	up.Namespace, up.ReuseValues = r.Namespace, reuse
	up.Wait, up.Timeout = true, r.timeout()
	if _, err := up.RunWithContext(ctx, r.Name, c, vals); err != nil {
		return fmt.Errorf("helm upgrade %s: %w", r.Name, err)
	}
	return nil
}

// Values are the user-supplied values of the release (helm get values).
func (r Release) Values() (map[string]any, error) {
	cfg, err := r.config()
	if err != nil {
		return nil, err
	}
	return action.NewGetValues(cfg).Run(r.Name)
}

// Uninstall removes the release and waits until its resources are gone.
func (r Release) Uninstall() error {
	cfg, err := r.config()
	if err != nil {
		return err
	}
	un := action.NewUninstall(cfg)
	un.Wait, un.Timeout = true, r.timeout()
	if _, err := un.Run(r.Name); err != nil {
		return fmt.Errorf("helm uninstall %s: %w", r.Name, err)
	}
	return nil
}
