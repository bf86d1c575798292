package fetch

import (
	"time"

	"github.com/csi-composefs/csi-composefs/pkg/cfs"
)

// Pin marks an image in use by a mount: GC never removes a pinned image or
// its objects, even when the image file itself leaves the store (Verify
// quarantines it): the objects' list is kept from the first pin while the
// image is indexed, or else taken when GC next indexes it. Pins are counted
// and kept in memory only.
func (s *Store) Pin(image cfs.Digest) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.pins[image]++
	if _, ok := s.pinObjs[image]; !ok {
		if objs, ok := s.index[image]; ok {
			s.pinObjs[image] = objs
		}
	}
	s.lastUse[image] = time.Now()
	s.gen++
}

// setIndex caches the objects of image, and keeps them for its pins.
func (s *Store) setIndex(image cfs.Digest, objs []cfs.Object) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.index[image] = objs
	if _, ok := s.pinObjs[image]; !ok && s.pins[image] > 0 {
		s.pinObjs[image] = objs
	}
}

// Unpin releases one Pin.
func (s *Store) Unpin(image cfs.Digest) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.pins[image] <= 1 {
		delete(s.pins, image)
		delete(s.pinObjs, image)
	} else {
		s.pins[image]--
	}
	s.lastUse[image] = time.Now()
}

// Pinned returns the pinned images and their pin counts.
func (s *Store) Pinned() map[cfs.Digest]int {
	s.mu.Lock()
	defer s.mu.Unlock()
	m := make(map[cfs.Digest]int, len(s.pins))
	for k, v := range s.pins {
		m[k] = v
	}
	return m
}

// hold marks image busy until the returned func is called.
func (s *Store) hold(image cfs.Digest) func() {
	s.mu.Lock()
	s.busy[image]++
	s.lastUse[image] = time.Now()
	s.gen++
	s.mu.Unlock()
	return func() {
		s.mu.Lock()
		if s.busy[image] <= 1 {
			delete(s.busy, image)
		} else {
			s.busy[image]--
		}
		s.lastUse[image] = time.Now()
		s.mu.Unlock()
	}
}
