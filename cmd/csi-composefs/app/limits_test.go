package app

import (
	"fmt"
	"strings"
	"testing"

	"github.com/spf13/pflag"

	"github.com/csi-composefs/csi-composefs/pkg/fetch"
)

func TestLimitFlags(t *testing.T) {
	for _, tc := range []struct {
		args    []string
		want    fetch.Options
		wantErr string
	}{
		{nil, fetch.Options{MaxImageSize: 128 << 20, DownloadBudget: 1 << 30, ParseMemory: 256 << 20, MaxObjectSize: 16 << 30, MinFreeSpace: 1 << 30}, ""},
		{[]string{"--download-budget", "0", "--parse-memory", "0", "--max-object-size", "0", "--min-free-space", "0", "--max-image-size", "8M"},
			fetch.Options{MaxImageSize: 8 << 20, DownloadBudget: -1, ParseMemory: -1, MaxObjectSize: -1, MinFreeSpace: -1}, ""},
		{[]string{"--parse-memory", "12Q"}, fetch.Options{}, "--parse-memory"},
		{[]string{"--download-budget", "-5"}, fetch.Options{}, "--download-budget"},
		{[]string{"--max-image-size", "0"}, fetch.Options{}, "--max-image-size"},
	} {
		var l limitFlags
		fs := pflag.NewFlagSet("serve", pflag.ContinueOnError)
		l.add(fs)
		if err := fs.Parse(tc.args); err != nil {
			t.Fatal(err)
		}
		var o fetch.Options
		err := l.apply(&o, fmt.Errorf)
		if tc.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("%q: %v, want an error naming %s", tc.args, err, tc.wantErr)
			}
			continue
		}
		if err != nil || o.MaxImageSize != tc.want.MaxImageSize || o.DownloadBudget != tc.want.DownloadBudget ||
			o.ParseMemory != tc.want.ParseMemory || o.MaxObjectSize != tc.want.MaxObjectSize || o.MinFreeSpace != tc.want.MinFreeSpace {
			t.Errorf("%q: %+v %v, want %+v", tc.args, o, err, tc.want)
		}
	}
}
