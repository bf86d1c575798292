package pack

import (
	"testing"

	"github.com/csi-composefs/csi-composefs/pkg/cfs"
)

func TestPlan(t *testing.T) {
	ent := func(pack int, off int64, size uint64) Entry {
		var d cfs.Digest
		d[0], d[1], d[2] = byte(pack), byte(off>>9), byte(off>>17)
		return Entry{Digest: d, Size: size, Pack: pack, Offset: off}
	}
	const big = 100 << 20
	for _, tt := range []struct {
		name  string
		ents  []Entry
		whole bool
		// want: per run, its pack, first byte, end and objects.
		want [][4]int64
	}{
		{"one object", []Entry{ent(0, 1024, 100)}, false, [][4]int64{{0, 1024, 1124, 1}}},
		{"close objects share a run", []Entry{ent(0, 1024, 100), ent(0, 2048, 100)}, false, [][4]int64{{0, 1024, 2148, 2}}},
		{"a gap past MaxRunGap splits", []Entry{ent(0, 1024, 100), ent(0, 1024+100+MaxRunGap+512, 100)}, false,
			[][4]int64{{0, 1024, 1124, 1}, {0, 1024 + 100 + MaxRunGap + 512, 1024 + 100 + MaxRunGap + 612, 1}}},
		{"packs apart, in pack order", []Entry{ent(1, 512, 10), ent(0, 512, 10)}, false, [][4]int64{{0, 512, 522, 1}, {1, 512, 522, 1}}},
		{"MaxRunBytes splits", []Entry{ent(0, 512, MaxRunBytes-1024), ent(0, MaxRunBytes, 4096)}, false,
			[][4]int64{{0, 512, MaxRunBytes - 512, 1}, {0, MaxRunBytes, MaxRunBytes + 4096, 1}}},
		{"whole: from the pack's start", []Entry{ent(0, 1024, 100), ent(0, 50<<20, 100)}, true, [][4]int64{{0, 0, 50<<20 + 100, 2}}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			runs := Plan(tt.ents, func(int) int64 { return big }, tt.whole)
			if len(runs) != len(tt.want) {
				t.Fatalf("%d runs, want %d: %+v", len(runs), len(tt.want), runs)
			}
			for i, r := range runs {
				got := [4]int64{int64(r.Pack), r.Starts[0], r.End, int64(len(r.Entries))}
				if got != tt.want[i] {
					t.Errorf("run %d: pack, start, end, objects %v, want %v", i, got, tt.want[i])
				}
				// The skips add up: each object starts where the body says.
				pos := r.Starts[0]
				for j, e := range r.Entries {
					if r.Starts[j] != pos {
						t.Errorf("run %d object %d: resumes at %d, want %d", i, j, r.Starts[j], pos)
					}
					pos += r.Skips[j]
					if pos != e.Offset {
						t.Errorf("run %d object %d at %d, body puts it at %d", i, j, e.Offset, pos)
					}
					pos += int64(e.Size)
				}
			}
		})
	}
}
