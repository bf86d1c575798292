package main

import (
	"fmt"

	"github.com/spf13/cobra"

	"github.com/csi-composefs/csi-composefs/pkg/fetch/oci"
)

func newOCICmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "oci",
		Short: "Registry references: the composefs digest they name",
	}
	cmd.AddCommand(newOCIDigestCmd())
	return cmd
}

func newOCIDigestCmd() *cobra.Command {
	var (
		sf sourceFlags
		rf registryFlags
	)
	cmd := &cobra.Command{
		Use:   "digest (oci://REGISTRY/REPO:TAG | docker://REGISTRY/REPO:TAG)",
		Short: "Print the composefs image digest a reference gives on a node",
		Long: `Print the fs-verity digest of the composefs image a reference gives on a
node: for oci://, the artifact's annotated digest; for docker://, the digest
of the container image converted as the node converts it (its layers are
fetched and hashed; nothing is stored). Pin it in a volume's digest
attribute.`,
		Args: exactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			ref, err := oci.ParseReference(args[0])
			if err != nil {
				return usageError{err}
			}
			o, err := rf.options(&sf)
			if err != nil {
				return err
			}
			c, err := oci.NewClient(ref, o)
			if err != nil {
				return usageError{err}
			}
			if ref.Scheme == oci.SchemeArtifact {
				a, err := c.ResolveArtifact(cmd.Context(), ref.Name())
				if err != nil {
					return err
				}
				fmt.Fprintln(cmd.OutOrStdout(), a.Digest)
				return nil
			}
			d, err := oci.ConvertedDigest(cmd.Context(), oci.NewImageSource(c, ref, oci.ConvertLimits{}))
			if err != nil {
				return err
			}
			fmt.Fprintln(cmd.OutOrStdout(), d)
			return nil
		},
	}
	sf.addRegistryCredentials(cmd)
	rf.add(cmd, false)
	return cmd
}
