package pack

import (
	"sort"
)

// How missing objects become requests (Plan).
const (
	// MaxRunGap: objects closer than this in a pack share a request; the
	// bytes between them are read and dropped.
	MaxRunGap = 64 << 10
	// MaxRunBytes bounds one request, so that a pack is read by several
	// requests at once and a retry repeats little.
	MaxRunBytes = 16 << 20
	// WholePackShare: when more than this share of a pack's bytes are
	// missing, all of the pack is read (its gaps included).
	WholePackShare = 0.5
)

// Run is one single-range request of a pack: the objects it brings, in
// offset order.
type Run struct {
	Pack    int
	Entries []Entry
	// Skips[i] are the bytes before entry i in the body (a tar header, a
	// gap, or for the first one: none, or the pack's start when whole).
	Skips []int64
	// Starts[i] is where the body starts when a retry resumes at entry i
	// (its skip included).
	Starts []int64
	// End is the end of the last entry: the request is Starts[from]..End-1.
	End int64
}

// Plan groups the entries (of objects a node lacks) by pack and, in each
// pack, into runs in offset order: a new run starts at a gap of more than
// MaxRunGap (unless more than WholePackShare of the pack is missing: then
// the gaps of the pack are read), past MaxRunBytes, or where entries
// overlap. With whole (the server ignored Range before) each pack is one
// run from its start. packSize gives a pack's size. Runs come in pack
// order.
func Plan(ents []Entry, packSize func(pack int) int64, whole bool) []Run {
	byPack := make(map[int][]Entry)
	for _, e := range ents {
		byPack[e.Pack] = append(byPack[e.Pack], e)
	}
	packs := make([]int, 0, len(byPack))
	for p := range byPack {
		packs = append(packs, p)
	}
	sort.Ints(packs)
	var runs []Run
	for _, p := range packs {
		ents := byPack[p]
		sort.Slice(ents, func(i, j int) bool { return ents[i].Offset < ents[j].Offset })
		var need uint64
		for _, e := range ents {
			need += e.Size
		}
		size := packSize(p)
		gap := int64(MaxRunGap)
		limit := int64(MaxRunBytes)
		if float64(need) > WholePackShare*float64(size) {
			gap = size
		}
		if whole {
			gap, limit = size, size
		}
		cur := -1
		var runStart int64
		for _, e := range ents {
			end := e.Offset + int64(e.Size)
			if cur >= 0 {
				r := &runs[cur]
				if e.Offset < r.End || e.Offset-r.End > gap || end-runStart > limit {
					cur = -1
				}
			}
			if cur < 0 {
				runStart = e.Offset
				if whole {
					runStart = 0
				}
				runs = append(runs, Run{Pack: p, End: runStart})
				cur = len(runs) - 1
			}
			r := &runs[cur]
			r.Entries = append(r.Entries, e)
			r.Skips = append(r.Skips, e.Offset-r.End)
			r.Starts = append(r.Starts, r.End)
			r.End = end
		}
	}
	return runs
}
