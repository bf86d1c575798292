package app

import (
	"github.com/spf13/pflag"

	"github.com/csi-composefs/csi-composefs/pkg/fetch"
)

// limitFlags are the node-wide resource limits of serve (sizes in bytes,
// or with K/M/G/T).
type limitFlags struct {
	maxImageSize, downloadBudget, parseMemory, maxObjectSize, minFreeSpace string
}

func (l *limitFlags) add(f *pflag.FlagSet) {
	f.StringVar(&l.maxImageSize, "max-image-size", "128M", "largest image accepted")
	f.StringVar(&l.downloadBudget, "download-budget", "1G", "bytes all downloads may hold in the store's tmp/ at once; more wait their turn, one larger than the budget runs alone (0 = none)")
	f.StringVar(&l.parseMemory, "parse-memory", "256M", "memory all image parses (and canonical checks) may take at once, estimated from each image's entries as it is parsed; more wait their turn, and an image whose tree would take more than the whole budget is refused with ResourceExhausted (0 = none)")
	f.StringVar(&l.maxObjectSize, "max-object-size", "16G", "an image needing a larger object is refused before downloading, with ResourceExhausted (0 = no limit)")
	f.StringVar(&l.minFreeSpace, "min-free-space", "1G", "free space downloads leave on the store's filesystem: objects that do not fit are refused before downloading, with ResourceExhausted (0 = no check)")
}

// apply sets the limits in o; 0 ("none") becomes -1, the store's "none".
func (l *limitFlags) apply(o *fetch.Options, usageErrorf func(string, ...any) error) error {
	var err error
	if o.MaxImageSize, err = ParseSize(l.maxImageSize); err != nil || o.MaxImageSize == 0 {
		return usageErrorf("--max-image-size: must be a positive size, not %q", l.maxImageSize)
	}
	for _, x := range []struct {
		flag, val string
		dst       *int64
	}{
		{"--download-budget", l.downloadBudget, &o.DownloadBudget},
		{"--parse-memory", l.parseMemory, &o.ParseMemory},
		{"--max-object-size", l.maxObjectSize, &o.MaxObjectSize},
		{"--min-free-space", l.minFreeSpace, &o.MinFreeSpace},
	} {
		n, err := ParseSize(x.val)
		if err != nil {
			return usageErrorf("%s: %v", x.flag, err)
		}
		if n == 0 {
			n = -1
		}
		*x.dst = n
	}
	return nil
}
