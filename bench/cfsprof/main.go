// Command cfsprof runs one composefs tool operation the way `csi-composefs
// image …` does, writing CPU and heap profiles, to find where the image
// tools spend time and memory:
//
//	go run ./bench/cfsprof -cpuprofile cpu.out -memprofile mem.out dump IMG
//	go run ./bench/cfsprof … walk IMG            (Open + walk, strict)
//	go run ./bench/cfsprof … stream IMG          (DumpImage, as image dump)
//	go run ./bench/cfsprof … build SRC [STORE]    (build from a directory)
//	go run ./bench/cfsprof … fromfile DUMP        (build from a dumpfile)
//
// The heap profile is taken at the operation's end (inuse: what is live
// then; alloc: everything allocated).
package main

import (
	"bufio"
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"runtime"
	"runtime/pprof"
	"time"

	"github.com/csi-composefs/csi-composefs/pkg/cfs"
)

func main() {
	cpu := flag.String("cpuprofile", "", "CPU profile output")
	mem := flag.String("memprofile", "", "heap profile output, written when the operation ends")
	lenient := flag.Bool("lenient", false, "walk: open as composefs-info reads (any redirect, files the kernel cannot read); dump always does")
	flag.Parse()
	if flag.NArg() < 2 {
		fmt.Fprintln(os.Stderr, "usage: cfsprof [-cpuprofile F] [-memprofile F] dump|stream|walk|build|fromfile ARG [STORE]")
		os.Exit(2)
	}
	if *cpu != "" {
		f, err := os.Create(*cpu)
		if err != nil {
			fail(err)
		}
		if err := pprof.StartCPUProfile(f); err != nil {
			fail(err)
		}
	}
	start := time.Now()
	var keep any
	var err error
	switch op, arg := flag.Arg(0), flag.Arg(1); op {
	case "stream":
		var f *os.File
		if f, err = os.Open(arg); err == nil {
			st, _ := f.Stat()
			w := bufio.NewWriter(io.Discard)
			err = cfs.DumpImage(w, f, st.Size(), cfs.OpenOptions{AllowForeignRedirects: true, AllowUnreadableFiles: true})
			f.Close()
		}
	case "dump", "walk":
		var img *cfs.Image
		img, err = open(arg, op == "dump" || *lenient)
		if err == nil && op == "dump" {
			w := bufio.NewWriter(io.Discard)
			err = cfs.WriteDump(w, img.Root())
		}
		if err == nil && op == "walk" {
			n := 0
			err = img.Root().Walk(func(*cfs.Node) error { n++; return nil })
			fmt.Fprintf(os.Stderr, "%d entries, %d objects\n", n, img.Stats().Objects)
		}
		keep = img
	case "build":
		var root *cfs.Node
		root, err = cfs.BuildFromDir(context.Background(), arg, cfs.DirOptions{DigestStore: flag.Arg(2)})
		if err == nil {
			_, err = cfs.WriteImage(io.Discard, root, cfs.DefaultWriteOptions())
		}
		keep = root
	case "fromfile":
		var f *os.File
		if f, err = os.Open(arg); err == nil {
			var root *cfs.Node
			root, err = cfs.ParseDump(bufio.NewReader(f), cfs.DumpOptions{})
			f.Close()
			if err == nil {
				_, err = cfs.WriteImage(io.Discard, root, cfs.DefaultWriteOptions())
			}
			keep = root
		}
	default:
		err = fmt.Errorf("unknown operation %q", op)
	}
	if *cpu != "" {
		pprof.StopCPUProfile()
	}
	if err != nil {
		fail(err)
	}
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	fmt.Fprintf(os.Stderr, "%.3f s, heap in use %.1f MiB, total allocated %.1f MiB, %d GCs\n",
		time.Since(start).Seconds(), float64(ms.HeapInuse)/(1<<20), float64(ms.TotalAlloc)/(1<<20), ms.NumGC)
	if *mem != "" {
		f, err := os.Create(*mem)
		if err != nil {
			fail(err)
		}
		if err := pprof.Lookup("allocs").WriteTo(f, 0); err != nil {
			fail(err)
		}
		f.Close()
	}
	runtime.KeepAlive(keep)
}

func open(path string, lenient bool) (*cfs.Image, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	return cfs.Open(f, st.Size(), cfs.OpenOptions{AllowForeignRedirects: lenient, AllowUnreadableFiles: lenient})
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "cfsprof:", err)
	os.Exit(1)
}
