package vm

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"sync"
)

// volatileDisk is the guest's disk as a real one behaves at a power cut: a
// disk image served to QEMU over NBD (a unix socket) through a volatile
// write cache. Writes land in the cache; a flush (or a FUA write) moves
// them to the image; when the connection drops without a disconnect
// request (QEMU killed), only a random subset of the cached pages reaches
// the image, in no particular order, and the rest is lost, as in a disk's
// cache at a power cut.
//
// Why not a plain image file: with any QEMU cache mode, what the guest
// wrote to its virtual disk before QEMU is killed is already in the host
// file (or the host's page cache, which the kill does not lose); only the
// guest's own page cache is lost. That catches a missing fsync but not a
// missing flush or a write ordered wrongly against one. QEMU's
// cache=writeback gives the guest a volatile write cache and passes its
// flushes on (here as NBD_CMD_FLUSH); this server makes the cache really
// volatile.
type volatileDisk struct {
	f    *os.File
	size int64
	ln   net.Listener

	ended chan bool // after each connection: whether it ended cleanly

	mu      sync.Mutex
	rng     *rand.Rand
	pending map[int64][]byte // page → content not yet stable
	stats   diskStats
}

type diskStats struct {
	Writes, Flushes      int
	PagesLost, PagesKept int // at power cuts: cached pages dropped, and kept anyway
	Cuts                 int
}

const nbdPage = 4096

func newVolatileDisk(path, sock string, rng *rand.Rand) (*volatileDisk, error) {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return nil, err
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, err
	}
	ln, err := net.Listen("unix", sock)
	if err != nil {
		f.Close()
		return nil, err
	}
	d := &volatileDisk{f: f, size: fi.Size(), ln: ln, rng: rng, pending: make(map[int64][]byte), ended: make(chan bool, 1)}
	go d.serve()
	return d, nil
}

func (d *volatileDisk) close() {
	d.ln.Close()
	d.f.Close()
}

func (d *volatileDisk) snapshot() diskStats {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.stats
}

func (d *volatileDisk) serve() {
	for {
		c, err := d.ln.Accept()
		if err != nil {
			return
		}
		// One client at a time: QEMU's.
		clean := d.handle(c)
		c.Close()
		if clean {
			d.flush()
		} else {
			d.powerCut()
		}
		d.ended <- clean
	}
}

// flush makes every cached page stable.
func (d *volatileDisk) flush() {
	d.mu.Lock()
	defer d.mu.Unlock()
	for pg, b := range d.pending {
		d.persist(pg, b)
	}
	clear(d.pending)
}

// powerCut keeps a random half of the cached pages and loses the rest.
func (d *volatileDisk) powerCut() {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.stats.Cuts++
	for pg, b := range d.pending {
		if d.rng.IntN(2) == 0 {
			d.persist(pg, b)
			d.stats.PagesKept++
		} else {
			d.stats.PagesLost++
		}
	}
	clear(d.pending)
}

func (d *volatileDisk) persist(pg int64, b []byte) {
	if _, err := d.f.WriteAt(b, pg*nbdPage); err != nil {
		panic(fmt.Sprintf("volatile disk: writing the image: %v", err))
	}
}

// page returns the current content of a page (cached or stable).
func (d *volatileDisk) page(pg int64) []byte {
	if b, ok := d.pending[pg]; ok {
		return b
	}
	b := make([]byte, nbdPage)
	if _, err := d.f.ReadAt(b, pg*nbdPage); err != nil && !errors.Is(err, io.EOF) {
		panic(fmt.Sprintf("volatile disk: reading the image: %v", err))
	}
	return b
}

func (d *volatileDisk) read(p []byte, off int64) {
	d.mu.Lock()
	defer d.mu.Unlock()
	for len(p) > 0 {
		pg, in := off/nbdPage, off%nbdPage
		n := copy(p, d.page(pg)[in:])
		p, off = p[n:], off+int64(n)
	}
}

func (d *volatileDisk) write(p []byte, off int64, fua bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.stats.Writes++
	for len(p) > 0 {
		pg, in := off/nbdPage, off%nbdPage
		b := d.page(pg)
		if _, cached := d.pending[pg]; !cached {
			b = append([]byte(nil), b...)
		}
		n := copy(b[in:], p)
		if fua {
			d.persist(pg, b)
			delete(d.pending, pg)
		} else {
			d.pending[pg] = b
		}
		p, off = p[n:], off+int64(n)
	}
}

// NBD protocol constants (the fixed newstyle handshake, simple replies).
const (
	nbdMagic        = 0x4e42444d41474943 // "NBDMAGIC"
	nbdOptMagic     = 0x49484156454f5054 // "IHAVEOPT"
	nbdRepMagic     = 0x0003e889045565a9
	nbdReqMagic     = 0x25609513
	nbdSimpleMagic  = 0x67446698
	nbdFixedNew     = 1
	nbdNoZeroes     = 2
	nbdOptExport    = 1
	nbdOptAbort     = 2
	nbdOptInfo      = 6
	nbdOptGo        = 7
	nbdRepAck       = 1
	nbdRepInfo      = 3
	nbdRepErrUnsup  = 1<<31 + 1
	nbdFlagHasFlags = 1
	nbdFlagFlush    = 4
	nbdFlagFUA      = 8
	nbdCmdRead      = 0
	nbdCmdWrite     = 1
	nbdCmdDisc      = 2
	nbdCmdFlush     = 3
	nbdCmdFlagFUA   = 1
	nbdEINVAL       = 22
)

// handle serves one connection; it reports whether the client
// disconnected cleanly (NBD_CMD_DISC).
func (d *volatileDisk) handle(c net.Conn) bool {
	be := binary.BigEndian
	var hs [18]byte
	be.PutUint64(hs[0:], nbdMagic)
	be.PutUint64(hs[8:], nbdOptMagic)
	be.PutUint16(hs[16:], nbdFixedNew|nbdNoZeroes)
	if _, err := c.Write(hs[:]); err != nil {
		return false
	}
	var cflags [4]byte
	if _, err := io.ReadFull(c, cflags[:]); err != nil {
		return false
	}
	noZeroes := be.Uint32(cflags[:])&nbdNoZeroes != 0
	const tflags = nbdFlagHasFlags | nbdFlagFlush | nbdFlagFUA
	reply := func(opt, typ uint32, data []byte) error {
		var h [20]byte
		be.PutUint64(h[0:], nbdRepMagic)
		be.PutUint32(h[8:], opt)
		be.PutUint32(h[12:], typ)
		be.PutUint32(h[16:], uint32(len(data)))
		_, err := c.Write(append(h[:], data...))
		return err
	}
	// Options, until one starts the transmission.
	for {
		var h [16]byte
		if _, err := io.ReadFull(c, h[:]); err != nil {
			return false
		}
		if be.Uint64(h[0:]) != nbdOptMagic {
			return false
		}
		opt, n := be.Uint32(h[8:]), be.Uint32(h[12:])
		if n > 1<<20 {
			return false
		}
		if _, err := io.CopyN(io.Discard, c, int64(n)); err != nil {
			return false
		}
		switch opt {
		case nbdOptExport:
			var r [10 + 124]byte
			be.PutUint64(r[0:], uint64(d.size))
			be.PutUint16(r[8:], tflags)
			out := r[:]
			if noZeroes {
				out = r[:10]
			}
			if _, err := c.Write(out); err != nil {
				return false
			}
			return d.transmit(c)
		case nbdOptInfo, nbdOptGo:
			var info [12]byte // NBD_INFO_EXPORT
			be.PutUint16(info[0:], 0)
			be.PutUint64(info[2:], uint64(d.size))
			be.PutUint16(info[10:], tflags)
			if reply(opt, nbdRepInfo, info[:]) != nil || reply(opt, nbdRepAck, nil) != nil {
				return false
			}
			if opt == nbdOptGo {
				return d.transmit(c)
			}
		case nbdOptAbort:
			_ = reply(opt, nbdRepAck, nil)
			return true
		default:
			if reply(opt, nbdRepErrUnsup, nil) != nil {
				return false
			}
		}
	}
}

func (d *volatileDisk) transmit(c net.Conn) bool {
	be := binary.BigEndian
	var req [28]byte
	var buf []byte
	for {
		if _, err := io.ReadFull(c, req[:]); err != nil {
			return false
		}
		if be.Uint32(req[0:]) != nbdReqMagic {
			return false
		}
		flags, typ := be.Uint16(req[4:]), be.Uint16(req[6:])
		handle := req[8:16]
		off, n := int64(be.Uint64(req[16:])), int64(be.Uint32(req[24:]))
		var errno uint32
		if (typ == nbdCmdRead || typ == nbdCmdWrite) && (off < 0 || off+n > d.size) {
			errno = nbdEINVAL
		}
		if int64(cap(buf)) < n {
			buf = make([]byte, n)
		}
		data := buf[:n]
		switch typ {
		case nbdCmdWrite:
			if _, err := io.ReadFull(c, data); err != nil {
				return false
			}
			if errno == 0 {
				d.write(data, off, flags&nbdCmdFlagFUA != 0)
			}
			data = nil
		case nbdCmdRead:
			if errno == 0 {
				d.read(data, off)
			} else {
				data = nil
			}
		case nbdCmdFlush:
			d.flush()
			d.mu.Lock()
			d.stats.Flushes++
			d.mu.Unlock()
			data = nil
		case nbdCmdDisc:
			return true
		default:
			errno, data = nbdEINVAL, nil
		}
		var r [16]byte
		be.PutUint32(r[0:], nbdSimpleMagic)
		be.PutUint32(r[4:], errno)
		copy(r[8:], handle)
		if _, err := c.Write(append(r[:], data...)); err != nil {
			return false
		}
	}
}
