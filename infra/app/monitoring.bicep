// Log Analytics + workspace-based Application Insights with local (instrumentation-key) auth disabled:
// telemetry is accepted only with an Entra token, so the connection string alone cannot write data.
param logAnalyticsName string
param applicationInsightsName string
param location string
param tags object = {}
param retentionInDays int = 30
@description('Entra-only ingestion. Every exporter must then send a token: the host uses APPLICATIONINSIGHTS_AUTHENTICATION_STRING, the gateway\'s opencensus exporters need credential=ManagedIdentityCredential(client_id=AZURE_CLIENT_ID).')
param disableLocalAuth bool = true

resource workspace 'Microsoft.OperationalInsights/workspaces@2025-02-01' = {
  name: logAnalyticsName
  location: location
  tags: tags
  properties: {
    sku: {
      name: 'PerGB2018'
    }
    retentionInDays: retentionInDays
    features: {
      disableLocalAuth: disableLocalAuth
    }
  }
}

resource appInsights 'Microsoft.Insights/components@2020-02-02' = {
  name: applicationInsightsName
  location: location
  tags: tags
  kind: 'web'
  properties: {
    Application_Type: 'web'
    WorkspaceResourceId: workspace.id
    DisableLocalAuth: disableLocalAuth
    IngestionMode: 'LogAnalytics'
  }
}

output workspaceId string = workspace.id
output applicationInsightsId string = appInsights.id
output applicationInsightsName string = appInsights.name
// Not a secret: with DisableLocalAuth the instrumentation key cannot ingest without an Entra token.
output connectionString string = appInsights.properties.ConnectionString
