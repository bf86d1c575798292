package pack

import (
	"reflect"
	"testing"

	"github.com/csi-composefs/csi-composefs/pkg/cfs"
)

func TestCut(t *testing.T) {
	objs := func(sizes ...uint64) []cfs.Object {
		var o []cfs.Object
		for i, s := range sizes {
			var d cfs.Digest
			d[0] = byte(i)
			o = append(o, cfs.Object{Digest: d, Size: s})
		}
		return o
	}
	for _, c := range []struct {
		name     string
		sizes    []uint64
		packSize int64
		want     []int // objects per pack
	}{
		{"none", nil, 1 << 20, nil},
		{"all in one", []uint64{100, 200, 300}, 1 << 20, []int{3}},
		// Each object counts a header block: 1000+512 then 1000 more is
		// 2512 > 2400, so the second starts a pack.
		{"headers count", []uint64{1000, 1000, 1000}, 2400, []int{1, 1, 1}},
		{"exactly full", []uint64{1000, 1000}, 2512, []int{2}},
		{"larger than a pack alone", []uint64{10, 5000, 10}, 2048, []int{1, 1, 1}},
		{"fills then cuts", []uint64{500, 500, 500, 500}, 2048, []int{2, 2}},
	} {
		t.Run(c.name, func(t *testing.T) {
			in := objs(c.sizes...)
			var got []int
			var flat []cfs.Object
			for _, p := range Cut(in, c.packSize) {
				got = append(got, len(p))
				flat = append(flat, p...)
			}
			if !reflect.DeepEqual(got, c.want) {
				t.Errorf("packs of %v objects, want %v", got, c.want)
			}
			if len(in) > 0 && !reflect.DeepEqual(flat, in) {
				t.Errorf("the packs hold %v, want every object once in order", flat)
			}
		})
	}
}
