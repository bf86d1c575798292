package main

import "github.com/spf13/cobra"

func newImageCmd() *cobra.Command {
	return newGroupCmd("image", "Build, inspect and mount composefs images",
		newImageBuildCmd(),
		newImageDigestCmd(),
		newImageDumpCmd(),
		newImageLsCmd(),
		newImageObjectsCmd(),
		newImageMountCmd(),
		newImagePushCmd(),
		newImageUmountCmd(),
		newImageVerifyCmd(),
	)
}
