package main

import (
	"fmt"
	"os"

	"github.com/spf13/cobra"

	"github.com/csi-composefs/csi-composefs/pkg/cfs"
)

func newImageDigestCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "digest FILE...",
		Short: "Print the fs-verity sha256 digest of files, like 'fsverity digest'",
		Long: `Print the fs-verity digest (SHA-256, 4096-byte blocks, no salt) of each FILE,
computed in userspace, one line per file: "sha256:<hex> FILE". This is the
name a file has in a composefs object store and the image digest a volume pins.`,
		Args: minArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			for _, name := range args {
				d, err := digestFile(name)
				if err != nil {
					return err
				}
				fmt.Fprintf(cmd.OutOrStdout(), "sha256:%s %s\n", d, name)
			}
			return nil
		},
	}
}

func digestFile(name string) (cfs.Digest, error) {
	f, err := os.Open(name)
	if err != nil {
		return cfs.Digest{}, err
	}
	defer f.Close()
	d, _, err := cfs.VerityDigestReader(f)
	if err != nil {
		return cfs.Digest{}, fmt.Errorf("%s: %w", name, err)
	}
	return d, nil
}
