package main

import "github.com/spf13/cobra"

func newImageCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "image",
		Short: "Build, inspect and mount composefs images",
	}
	cmd.AddCommand(
		newImageBuildCmd(),
		newImageDigestCmd(),
		newImageDumpCmd(),
		newImageLsCmd(),
		newImageObjectsCmd(),
		newImageMountCmd(),
		newImagePushCmd(),
		newImageUmountCmd(),
	)
	return cmd
}
