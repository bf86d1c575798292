// Package deploy tests how users install csi-composefs: the Helm chart
// (charts/csi-composefs, rendered with the Helm SDK) and the kustomize base
// (deploy/kubernetes, built with kustomize's Go API). It is a module of its
// own so that the product's go.mod never depends on Helm or kustomize.
package deploy
