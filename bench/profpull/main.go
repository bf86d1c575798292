// Command profpull pulls one image into a fresh store like `csi-composefs
// pull`, writing a CPU profile: go run ./bench/profpull -cpuprofile cpu.out
// -store-dir DIR -repository URL NAME (used to find where a pull spends time).
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"runtime"
	"runtime/pprof"
	"strings"
	"sync"
	"time"

	"k8s.io/klog/v2"

	"github.com/csi-composefs/csi-composefs/pkg/fetch"
)

// peakRSS is this process's VmHWM.
func peakRSS() string {
	b, _ := os.ReadFile("/proc/self/status")
	for _, l := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(l, "VmHWM:") {
			return strings.TrimSpace(strings.TrimPrefix(l, "VmHWM:"))
		}
	}
	return "?"
}

// samplePeaks samples the runtime's memory every 10 ms; the func it
// returns stops and describes the peaks.
func samplePeaks() func() string {
	var (
		mu                         sync.Mutex
		heap, stack, sys, goroutns uint64
		stop                       = make(chan struct{})
	)
	go func() {
		t := time.NewTicker(10 * time.Millisecond)
		defer t.Stop()
		var ms runtime.MemStats
		for {
			select {
			case <-stop:
				return
			case <-t.C:
			}
			runtime.ReadMemStats(&ms)
			mu.Lock()
			heap, stack, sys = max(heap, ms.HeapInuse), max(stack, ms.StackInuse), max(sys, ms.Sys-ms.HeapReleased)
			goroutns = max(goroutns, uint64(runtime.NumGoroutine()))
			mu.Unlock()
		}
	}()
	return func() string {
		close(stop)
		mu.Lock()
		defer mu.Unlock()
		return fmt.Sprintf("peaks: heap in use %.1f MiB, stacks %.1f MiB, runtime total %.1f MiB, goroutines %d",
			float64(heap)/(1<<20), float64(stack)/(1<<20), float64(sys)/(1<<20), goroutns)
	}
}

func main() {
	store := flag.String("store-dir", "", "store directory")
	repo := flag.String("repository", "", "repository URL")
	parallel := flag.Int("fetch-concurrency", 256, "most concurrent object downloads")
	prof := flag.String("cpuprofile", "", "CPU profile output")
	memprof := flag.String("memprofile", "", "heap profile output (at the end)")
	ca := flag.String("ca-file", "", "PEM bundle of extra trusted CAs")
	klog.InitFlags(nil)
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
	peaks := samplePeaks()
	start := time.Now()
	src, err := fetch.NewHTTPSource(*repo, fetch.HTTPOptions{CAFile: *ca})
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
				fmt.Printf("%s: %d objects fetched, %d bytes, %.2f s, peak RSS %s\n", d, st.Fetched, st.FetchedBytes, time.Since(start).Seconds(), peakRSS())
				fmt.Println(peaks())
				if *memprof != "" {
					if f, err := os.Create(*memprof); err == nil {
						pprof.WriteHeapProfile(f)
						f.Close()
					}
				}
			}
		}
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		pprof.StopCPUProfile()
		os.Exit(1)
	}
}
