package main

import (
	"fmt"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/csi-composefs/csi-composefs/pkg/fetch"
)

func newStoreCmd() *cobra.Command {
	return newGroupCmd("store", "Maintain the node store: gc, verify, du",
		newStoreGCCmd(), newStoreVerifyCmd(), newStoreDuCmd())
}

func newStoreGCCmd() *cobra.Command {
	var stf storeFlags
	cmd := &cobra.Command{
		Use:   "gc [--store-dir DIR] [--store-max-size SIZE]",
		Short: "Remove objects no image references; over the budget, least recently used images first",
		Long: `Remove objects no stored image references. With --store-max-size, first
remove images, least recently used first, until the store fits. Only for a
store no plugin is using (the store is locked); the plugin runs GC itself.`,
		Args: exactArgs(0),
		RunE: func(cmd *cobra.Command, args []string) error {
			opts, err := stf.options()
			if err != nil {
				return err
			}
			// A maintenance GC has no in-process users: no grace needed.
			opts.GCGrace = 1
			s, err := stf.openExisting(cmd.Context(), opts)
			if err != nil {
				return err
			}
			defer s.Close()
			st, err := s.GC(cmd.Context())
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "removed %d images and %d objects, freed %s; %s in use (%d images, %d objects)\n",
				st.ImagesRemoved, st.ObjectsRemoved, human(st.BytesFreed), human(st.BytesInUse), st.ImagesKept, st.ObjectsKept)
			return nil
		},
	}
	stf.addDir(cmd)
	stf.addMaxSize(cmd)
	return cmd
}

func newStoreVerifyCmd() *cobra.Command {
	var stf storeFlags
	cmd := &cobra.Command{
		Use:   "verify [--store-dir DIR]",
		Short: "Re-hash every object and image; move corrupt files to quarantine/ (exit 1 if any)",
		Args:  exactArgs(0),
		RunE: func(cmd *cobra.Command, args []string) error {
			s, err := stf.openExisting(cmd.Context(), fetch.Options{})
			if err != nil {
				return err
			}
			defer s.Close()
			rep, err := s.Verify(cmd.Context())
			out := cmd.OutOrStdout()
			for _, c := range rep.Corrupt {
				fmt.Fprintf(out, "corrupt: %s: %s (moved to %s)\n", c.Path, c.Reason, c.MovedTo)
			}
			for _, u := range rep.Unreadable {
				fmt.Fprintf(out, "unreadable (left in place): %s: %v\n", u.Path, u.Err)
			}
			if err != nil {
				return err
			}
			fmt.Fprintf(out, "verified %d objects and %d images (%s): %d corrupt\n",
				rep.Objects, rep.Images, human(rep.Bytes), len(rep.Corrupt))
			if len(rep.Corrupt) > 0 {
				return fmt.Errorf("%d corrupt files moved to %s/quarantine", len(rep.Corrupt), stf.dir)
			}
			return nil
		},
	}
	stf.addDir(cmd)
	return cmd
}

func newStoreDuCmd() *cobra.Command {
	var stf storeFlags
	cmd := &cobra.Command{
		Use:   "du [--store-dir DIR]",
		Short: "Show the files and bytes of the store (works while the plugin runs)",
		Args:  exactArgs(0),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := fetch.CheckStoreDir(stf.dir); err != nil {
				return usageErrorf("--store-dir: %v", err)
			}
			u, err := fetch.DiskUsage(cmd.Context(), stf.dir)
			if err != nil {
				return err
			}
			tw := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 0, 2, ' ', tabwriter.AlignRight)
			fmt.Fprintln(tw, "\tfiles\tbytes\t")
			for _, r := range []struct {
				name string
				u    fetch.Usage
			}{{"objects", u.Objects}, {"images", u.Images}, {"signatures", u.Signatures}, {"tmp", u.Tmp}, {"quarantine", u.Quarantine}} {
				fmt.Fprintf(tw, "%s\t%d\t%s\t\n", r.name, r.u.Files, human(r.u.Bytes))
			}
			total := u.Objects.Bytes + u.Images.Bytes + u.Signatures.Bytes + u.Tmp.Bytes + u.Quarantine.Bytes
			fmt.Fprintf(tw, "total\t\t%s\t\n", human(total))
			return tw.Flush()
		},
	}
	stf.addDir(cmd)
	return cmd
}
