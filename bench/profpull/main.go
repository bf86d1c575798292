// Command profpull pulls one image into a fresh store like `csi-composefs
// pull`, writing a CPU profile: go run ./bench/profpull -cpuprofile cpu.out
// -store-dir DIR -repository URL NAME (used to find where a pull spends time).
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"runtime/pprof"
	"time"

	"github.com/csi-composefs/csi-composefs/pkg/fetch"
)

func main() {
	store := flag.String("store-dir", "", "store directory")
	repo := flag.String("repository", "", "repository URL")
	parallel := flag.Int("fetch-concurrency", 16, "concurrent object downloads")
	prof := flag.String("cpuprofile", "", "CPU profile output")
	flag.Parse()
	if *store == "" || *repo == "" || flag.NArg() != 1 {
		fmt.Fprintln(os.Stderr, "usage: profpull -store-dir DIR -repository URL [-fetch-concurrency N] [-cpuprofile FILE] NAME")
		os.Exit(2)
	}
	if *prof != "" {
		f, err := os.Create(*prof)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		pprof.StartCPUProfile(f)
		defer pprof.StopCPUProfile()
	}
	ctx := context.Background()
	start := time.Now()
	src, err := fetch.NewHTTPSource(*repo, fetch.HTTPOptions{})
	if err == nil {
		var s *fetch.Store
		s, err = fetch.Open(ctx, *store, fetch.Options{Parallelism: *parallel})
		if err == nil {
			defer s.Close()
			var d interface{ String() string }
			dg, e := s.EnsureImage(ctx, src, fetch.ImageRef{Name: flag.Arg(0)})
			d, err = dg, e
			if err == nil {
				var st fetch.Stats
				st, err = s.EnsureObjects(ctx, src, dg)
				fmt.Printf("%s: %d objects fetched, %d bytes, %.2f s\n", d, st.Fetched, st.FetchedBytes, time.Since(start).Seconds())
			}
		}
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		pprof.StopCPUProfile()
		os.Exit(1)
	}
}
